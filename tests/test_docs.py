"""Every relative link in README.md and docs/**/*.md points to a file of the repository; the
speed targets' table in lego_jax/bench/README.md says of each workload what docs/performance.md's
says (a measurement recorded in one and not the other would leave a stale claim).

Also a hand check: `python tests/test_docs.py` prints each broken link (exit 1) or "links ok".
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")


def doc_files(root: Path = ROOT) -> list[Path]:
  return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def links(text: str) -> list[tuple[int, str]]:
  """(line number, target) of every markdown link or image outside code blocks and code spans."""
  found, in_fence = [], False
  for number, line in enumerate(text.splitlines(), 1):
    if FENCE.match(line):
      in_fence = not in_fence
      continue
    if in_fence:
      continue
    for match in LINK.finditer(CODE_SPAN.sub("", line)):
      found.append((number, match.group(1)))
  return found


def broken_links(root: Path = ROOT) -> list[str]:
  """'file:line: target' for each relative link whose file does not exist."""
  bad = []
  for doc in doc_files(root):
    for number, target in links(doc.read_text(encoding="utf-8")):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        continue  # a URL (https:, mailto:) or an anchor in the same file
      path = (doc.parent / target.split("#", 1)[0]).resolve()
      if not path.exists():
        bad.append(f"{doc.relative_to(root)}:{number}: {target}")
  return bad


def test_links_parse():
  text = ("see [a](docs/a.md#x), ![img](b.png) and [url](https://x.org)\n"
          "`[not](code.md)` [t](c.md \"title\")\n```\n[in](fence.md)\n```\n")
  assert links(text) == [(1, "docs/a.md#x"), (1, "b.png"), (1, "https://x.org"), (2, "c.md")]


def test_broken_link_is_reported(tmp_path):
  (tmp_path / "docs" / "sub").mkdir(parents=True)
  (tmp_path / "docs" / "here.md").write_text("x")
  (tmp_path / "README.md").write_text("[ok](docs/here.md) [gone](docs/gone.md)\n")
  (tmp_path / "docs" / "sub" / "n.md").write_text("[up](../here.md)\n[bad](here.md)\n")
  assert broken_links(tmp_path) == ["README.md:1: docs/gone.md", "docs/sub/n.md:2: here.md"]


def test_every_relative_link_resolves():
  assert doc_files(), "no documentation found"
  assert broken_links() == []


def target_status(text: str) -> dict[str, str]:
  """{workload: its lego_jax column} of the table headed `| workload (LEGO shapes) |`."""
  out, in_table = {}, False
  for line in text.splitlines():
    if line.startswith("| workload (LEGO shapes) |"):
      in_table = True
    elif in_table and line.startswith("|") and not line.startswith("| ---"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      out[cells[0]] = cells[-1]
    elif in_table and not line.startswith("|"):
      in_table = False
  return out


def test_bench_readme_targets_agree_with_performance_doc():
  bench = target_status((ROOT / "lego_jax" / "bench" / "README.md").read_text(encoding="utf-8"))
  perf = target_status((ROOT / "docs" / "performance.md").read_text(encoding="utf-8"))
  assert len(bench) == 5 and set(bench) <= set(perf), (sorted(bench), sorted(perf))
  assert bench == {k: perf[k] for k in bench}


if __name__ == "__main__":
  problems = broken_links()
  print("\n".join(problems) if problems else "links ok")
  sys.exit(1 if problems else 0)
