"""Fill a fresh venv (argv[2]) with the packages of the dev venv (argv[1]) except HF PEFT, as hard links.

The ecosystem tests need transformers, diffusers, TRL, accelerate, torch and pytest exactly as the dev venv
has them, and HF PEFT absent. Linking the installed files takes seconds where a second install downloads
gigabytes; files on another filesystem are copied instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

EXCLUDED = ("peft",)  # HF PEFT: its package and its dist-info


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python*/site-packages"))
    if len(found) != 1:
        raise SystemExit(f"expected one site-packages folder in {venv}, found {found}")
    return found[0]


def excluded(name: str) -> bool:
    stem = name.split("-")[0].split(".")[0].lower()
    return stem in EXCLUDED


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(source: str, target: str) -> None:
    src_dir = site_packages(Path(source))
    dst_dir = Path(target) / "lib" / src_dir.parent.name / "site-packages"
    dst_dir.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src_dir.iterdir()):
        if excluded(entry.name):
            continue
        dst = dst_dir / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, copy_function=link_or_copy, dirs_exist_ok=True)
        else:
            link_or_copy(str(entry), str(dst))
    print(f"{dst_dir}: the packages of {src_dir} less {', '.join(EXCLUDED)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
