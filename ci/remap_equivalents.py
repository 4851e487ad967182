"""Moves the ids in ci/mutants-equivalent.txt along with their lines after a change.

An id carries its line number (``path:line:col:op``). This maps each one through a diff of the
module between a git revision and the working tree: a line that survived unchanged gets its new
number; a line that changed or went is reported, to be judged again, and left as it was.

    python ci/remap_equivalents.py REV    # REV: the revision the list was last right for
"""

from __future__ import annotations

import difflib
import pathlib
import subprocess
import sys

LIST = pathlib.Path(__file__).with_name('mutants-equivalent.txt')


def line_map(old: list[str], new: list[str]) -> dict[int, int]:
    """Old line number -> new line number (1-based) for the lines the diff keeps."""
    mapping = {}
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, old_start, old_stop, new_start, _ in matcher.get_opcodes():
        if tag == 'equal':
            for offset in range(old_stop - old_start):
                mapping[old_start + offset + 1] = new_start + offset + 1
    return mapping


def remap(revision: str) -> list[str]:
    """Rewrites the list; returns the ids whose lines changed (left as they were)."""
    root = LIST.parent.parent
    maps: dict[str, dict[int, int]] = {}
    lost, out = [], []
    for line in LIST.read_text().splitlines(keepends=True):
        if line.startswith('#') or not line.strip():
            out.append(line)
            continue
        ident, _, reason = line.partition(' ')
        path, number, rest = ident.split(':', 2)
        if path not in maps:
            old = subprocess.run(['git', 'show', f'{revision}:{path}'], cwd=root, check=True,
                                 capture_output=True, text=True).stdout.splitlines()
            maps[path] = line_map(old, (root / path).read_text().splitlines())
        moved = maps[path].get(int(number))
        if moved is None:
            lost.append(ident)
            out.append(line)
        else:
            out.append(f'{path}:{moved}:{rest} {reason}')
    LIST.write_text(''.join(out))
    return lost


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    changed = remap(sys.argv[1])
    for ident in changed:
        print(f'changed, judge again: {ident}')
