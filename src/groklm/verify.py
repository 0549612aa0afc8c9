"""`groklm verify DIR`: check a download before anyone waits an hour to load it.

For the released checkpoint every file the config implies must be there and nothing else; each
pickle's header must parse under the restricted unpickler, and each array's dtype, shape and byte
length must match the config, within the file (a truncated file fails). Every problem is reported,
one per file, not just the first. With a manifest (the `sha256sum` lines a hub or torrent publishes,
`HASH  PATH`), each file's sha256 is checked too, with a progress bar over the bytes. The other
formats groklm reads are checked as their loaders check them before reading weights (headers, names,
shapes, dtypes).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from groklm import place
from groklm.config import GrokConfig
from groklm.files import CheckpointError, progress_bar
from groklm.formats import registry
from groklm.formats.released import checkpoint_config, find_ckpt_dir, read_param, reference_params

_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+?)\s*$")
_BSD = re.compile(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})\s*$")


@dataclass(frozen=True)
class Problem:
    file: str
    parameter: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.parameter}: {self.message}" if self.parameter else f"{self.file}: {self.message}"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass
class Report:
    root: Path
    format: str
    files: int
    bytes: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def read_manifest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 from `sha256sum` lines ("HASH  PATH") or BSD lines ("SHA256 (PATH) = HASH")."""
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m, bsd = _LINE.match(line), _BSD.match(line)
        if not m and not bsd:
            raise ValueError(f"{path}:{number}: not a sha256 line (HASH  PATH): {line[:80]!r}")
        digest, name = (m.group(1), m.group(2)) if m else (bsd.group(2), bsd.group(1))  # type: ignore[union-attr]
        out[name.removeprefix("./")] = digest.lower()
    return out


def sha256(path: Path, bar: object) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            bar.update(len(chunk))  # type: ignore[attr-defined]
    return h.hexdigest()


def checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def write_manifest(root: Path, out: Path, progress: bool = True) -> int:
    """Write `sha256sum` lines for every file under root (paths relative to root); returns the count."""
    files = [f for f in checkpoint_files(root) if f.resolve() != out.resolve()]
    bar = progress_bar(sum(f.stat().st_size for f in files), "sha256", progress, unit="B")
    lines = [f"{sha256(f, bar)}  {f.relative_to(root)}" for f in files]
    bar.close()
    out.write_text("\n".join(lines) + "\n")
    return len(files)


def verify(path: str | Path, config: GrokConfig | None = None, manifest: Path | None = None,
           progress: bool = True) -> Report:  # fmt: skip
    """Check the checkpoint at `path` (and its files' sha256 against `manifest`); never raises for a
    problem in the checkpoint: every one found is in the report."""
    root = Path(path)
    fmt = registry.detect(root)
    problems: list[Problem] = []
    if fmt.file_per_tensor:  # every file checked, not only up to the first problem
        problems += _released(root, config)
    else:
        problems += _by_loader(root, fmt, config)
    files = checkpoint_files(root) if root.is_dir() else [root]
    if manifest is not None:
        problems += _against(root if root.is_dir() else root.parent, files, read_manifest(manifest), progress, manifest)
    return Report(root, fmt.name, len(files), sum(f.stat().st_size for f in files), problems)


def _released(root: Path, config: GrokConfig | None) -> list[Problem]:
    ckpt = find_ckpt_dir(root)
    try:
        config = checkpoint_config(ckpt, config)
    except (ValueError, CheckpointError) as e:
        return [Problem(str(ckpt), None, str(e))]
    params = reference_params(config)
    expected = {p.file for p in params}
    problems = [
        Problem(str(ckpt / f.name), None, "not a file of this checkpoint (wrong config, or a stray file)")
        for f in sorted(ckpt.glob("tensor*")) if f.name not in expected
    ]  # fmt: skip
    for p in params:
        file = ckpt / p.file
        if not file.exists():
            problems.append(Problem(str(file), p.name, "missing"))
            continue
        try:
            read_param(ckpt, p)
        except CheckpointError as e:
            message = str(e).removeprefix(f"{file}: ").removesuffix(f" [parameter {p.name}]")
            problems.append(Problem(str(file), p.name, message.removeprefix(f"{p.name} ")))
    return problems


def _by_loader(root: Path, fmt: registry.Format, config: GrokConfig | None) -> list[Problem]:
    """Open the checkpoint as its loader does before reading weights; the first problem is reported."""
    try:
        place.laid_out(fmt.open(root, config, stream_table=True), torch.bfloat16)
    except (CheckpointError, ValueError) as e:
        where, _, what = str(e).partition(": ")
        return [Problem(where, None, what or str(e))]
    return []


def _against(base: Path, files: list[Path], manifest: dict[str, str], progress: bool, skip: Path) -> list[Problem]:
    problems = []
    listed = {(base / name).resolve(): (name, base / name) for name in manifest}
    for _, file in listed.values():
        if not file.is_file():
            problems.append(Problem(str(file), None, "in the manifest but missing"))
    problems += [Problem(str(f), None, "not in the manifest") for f in files
                 if f.resolve() not in listed and f.resolve() != skip.resolve()]  # fmt: skip
    todo = [(name, file) for name, file in listed.values() if file.is_file()]
    bar = progress_bar(sum(f.stat().st_size for _, f in todo), "sha256", progress, unit="B")
    for name, file in todo:
        got = sha256(file, bar)
        if got != manifest[name]:
            problems.append(Problem(str(file), None, f"sha256 {got} differs from the manifest's {manifest[name]}"))
    bar.close()
    return problems
