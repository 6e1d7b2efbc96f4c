"""The documentation agrees with the code.

- every flag that ``--help`` prints is in ``docs/cli.md``, under its command's heading, and no
  help text prints its default twice;
- a reader that follows ``docs/formats.md`` alone (its own code, h5py and numpy) turns a set
  into the pixels ``ddkd.load_synthset`` and ``ddkd inspect`` give, whitened sets included, and
  refuses the versions the page says to refuse;
- the README is a front page: short, no relative dates, no issue numbers;
- the method reference outside the repository is not pointed to; links between pages resolve.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import ddkd
from ddkd.cli import build_parser, main
from ddkd.data.transforms import ZCA, Normalization
from ddkd.errors import DDKDError
from ddkd.io.synthset import SynthSet, save_synthset

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SHIPPED = ROOT / "synth_sets" / "fashion-mnist_ipc10_default.h5"
# the pages a user reads; the relative-time and issue-number rules hold for all of them
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md",
         ROOT / "synth_sets" / "README.md", *sorted(DOCS.glob("*.md"))]


# --- (a) every --help flag is in docs/cli.md ------------------------------------------------


def _commands(parser: argparse.ArgumentParser,
              prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """``{"": top-level parser, "teach": its parser, ...}``, nested subcommands as "a b"."""
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix} {name}".strip()))
    return found


def _help_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string the parser's --help prints (suppressed options print none)."""
    return [flag for action in parser._actions if action.help is not argparse.SUPPRESS
            for flag in action.option_strings]


def _cli_sections(text: str) -> dict[str, str]:
    """docs/cli.md's level-2 sections by command: "## `ddkd teach`" -> {"teach": body}."""
    sections = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        match = re.fullmatch(r"`ddkd(?: ([\w -]+))?`", heading.strip())
        if match:
            sections[(match.group(1) or "").strip()] = body
    return sections


def _mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def undocumented_flags(parser: argparse.ArgumentParser, cli_md: str) -> list[str]:
    sections = _cli_sections(cli_md)
    missing = []
    for command, sub in _commands(parser).items():
        name = f"ddkd {command}".strip()
        if command not in sections:
            missing.append(f"{name} (no section '## `{name}`')")
            continue
        missing += [f"{name} {flag}" for flag in _help_flags(sub)
                    if not _mentions(sections[command], flag)]
    return missing


def test_every_help_flag_is_documented_under_its_command():
    cli_md = (DOCS / "cli.md").read_text()
    assert undocumented_flags(build_parser(), cli_md) == []
    # the check covers every command and all of their flags
    commands = _commands(build_parser())
    assert {"", "teach", "synthesize", "evaluate", "inspect"} <= set(commands)
    assert "--max-start-epoch" in _help_flags(commands["synthesize"])


@pytest.mark.parametrize("command, flag", [("teach", "--experts"), ("synthesize", "--seed"),
                                           ("", "--version"), ("inspect", "--nrow")])
def test_a_missing_flag_is_caught(command, flag):
    """Removing a flag's mentions from its command's section makes the check fail (a flag that
    is a prefix of another, or documented under another command, does not hide it)."""
    cli_md = (DOCS / "cli.md").read_text()
    name = f"ddkd {command}".strip()
    head, _, rest = cli_md.partition(f"## `{name}`\n")
    body, sep, tail = rest.partition("\n## ")
    body = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", "", body)
    assert undocumented_flags(build_parser(), head + f"## `{name}`\n" + body + sep + tail) == [
        f"{name} {flag}"]


def test_a_command_without_a_section_is_caught():
    cli_md = (DOCS / "cli.md").read_text().replace("## `ddkd inspect`", "## inspect")
    assert undocumented_flags(build_parser(), cli_md) == [
        "ddkd inspect (no section '## `ddkd inspect`')"]


def test_no_help_text_prints_its_default_twice():
    for command, parser in _commands(build_parser()).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                text = " ".join(formatter._expand_help(action).split())
                # "default: X" or "Default (0): X", stated by the text or appended by argparse
                stated = re.findall(r"\bdefault\b(?: \(\w+\))?:", text, flags=re.I)
                assert len(stated) <= 1, (command, action.option_strings, text)


def test_teach_help_gives_the_measured_time_per_cpu():
    description = " ".join(_commands(build_parser())["teach"].description.split())
    assert "8 min" not in description
    assert "about 3 minutes" in description and "AVX512-BF16" in description
    assert "AVX2-only" in description
    assert "tiny-imagenet" in " ".join(a.help for a in _commands(build_parser())["teach"]._actions
                                       if "--dataset" in a.option_strings)


# --- (b) a reader that follows docs/formats.md alone ------------------------------------------


def formats_reader() -> dict:
    """Run the reader code that docs/formats.md gives; it may import h5py and numpy only."""
    text = (DOCS / "formats.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = next(b for b in blocks if "def read_synthset_pixels" in b)
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(code))
                if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])}
    assert imported <= {"h5py", "numpy"}, imported
    namespace: dict = {}
    exec(compile(code, "docs/formats.md", "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


def test_the_formats_page_names_a_file_that_exists():
    assert "synth_sets/fashion-mnist_ipc10_default.h5" in (DOCS / "formats.md").read_text()
    assert SHIPPED.is_file()


def test_the_documented_reader_gives_ddkds_pixels_of_the_shipped_set():
    pixels = formats_reader()["read_synthset_pixels"](SHIPPED)
    s = ddkd.load_synthset(SHIPPED)
    assert s.zca is None and pixels.shape == tuple(s.images.shape)
    np.testing.assert_allclose(pixels, s.pixels().numpy(), rtol=0, atol=1e-6)
    # what the page says about values outside [0, 1] holds for this file
    raw = s.images.double() * s.std.view(1, -1, 1, 1) + s.mean.view(1, -1, 1, 1)
    text = " ".join((DOCS / "formats.md").read_text().split())
    below, above = 100 * float((raw < 0).double().mean()), 100 * float((raw > 1).double().mean())
    assert f"{below:.1f}% of the values fall below 0 and {above:.1f}% above 1" in text
    assert f"(from {float(raw.min()):.1f} to {float(raw.max()):.1f})" in text


def test_the_documented_reader_agrees_with_ddkd_inspects_png(tmp_path, capsys):
    pixels = formats_reader()["read_synthset_pixels"](SHIPPED)  # (100, 1, 28, 28)
    png = tmp_path / "grid.png"
    assert main(["inspect", str(SHIPPED), "--png", str(png)]) == 0
    capsys.readouterr()
    from PIL import Image

    grid = np.asarray(Image.open(png).convert("L"), dtype=np.int64)
    n, _, h, w = pixels.shape
    nrow = round(n ** 0.5)  # inspect's default: a square grid, 1-pixel padding
    cells = np.stack([grid[1 + (k // nrow) * (h + 1):][:h, 1 + (k % nrow) * (w + 1):][:, :w]
                      for k in range(n)])
    expected = np.floor(pixels[:, 0] * 255 + 0.5).astype(np.int64)  # the page's round(255 p)
    assert np.abs(cells - expected).max() <= 1  # float32 against float64 at a .5 boundary
    assert (cells != expected).mean() < 0.01


def _tiny_set(path: Path, whitened: bool) -> tuple[SynthSet, np.ndarray]:
    """A tiny set written by ddkd's own writer; with ``whitened``, in ZCA space. Returns the set
    and the real pixels (in [0, 1]) its first images are the whitened versions of."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (16, 3, 4, 4), generator=gen, dtype=torch.uint8)
    norm = Normalization.fit(real)
    x = norm(real)  # (16, 3, 4, 4) normalised
    zca = ZCA.fit(x) if whitened else None
    images = zca(x) if zca is not None else x
    images = images[:6].clone()
    images[4:] += 3 * torch.randn(images[4:].shape, generator=gen)  # pushed out of [0, 1]
    s = SynthSet(images=images.float(), targets=torch.randn(6, 5, generator=gen), lr=0.1,
                 mean=torch.tensor(norm.mean, dtype=torch.float64),
                 std=torch.tensor(norm.std, dtype=torch.float64), objective="mse",
                 provenance={"source_dataset": "test"}, config={"size": 6},
                 init_indices=torch.arange(6), history={"loss": [1.0], "lr": [0.1]}, zca=zca)
    save_synthset(path, s)
    return s, real[:4].double().numpy() / 255


@pytest.mark.parametrize("whitened", [False, True])
def test_the_documented_reader_undoes_normalisation_and_whitening(tmp_path, whitened):
    path = tmp_path / "tiny.h5"
    _, real_pixels = _tiny_set(path, whitened)
    with h5py.File(path) as f:
        assert ("zca" in f) is whitened
    pixels = formats_reader()["read_synthset_pixels"](path)
    ours = ddkd.load_synthset(path).pixels().numpy()
    np.testing.assert_allclose(pixels, ours, rtol=0, atol=1e-5)
    # independent of ddkd's reader: the unchanged images come back as the real pixels
    np.testing.assert_allclose(pixels[:4], real_pixels, rtol=0, atol=1e-4)
    assert pixels.min() == 0 and pixels.max() == 1  # the pushed images were clipped
    if whitened:  # "images * std + mean" alone, the old page's formula, is not the pixels
        with h5py.File(path) as f:
            naive = (f["images"][()] * f["normalization/std"][()].reshape(1, -1, 1, 1)
                     + f["normalization/mean"][()].reshape(1, -1, 1, 1))
        assert np.abs(np.clip(naive, 0, 1)[:4] - real_pixels).max() > 0.1


@pytest.mark.parametrize("value, refused", [
    (None, True), (0, True), (3, True), (1.0, True), ("1", True), (True, True),
    (np.array([1, 1]), True), (1, False), (np.int32(1), False)])
def test_the_documented_version_rule(tmp_path, value, refused):
    path = tmp_path / "tiny.h5"
    _tiny_set(path, whitened=False)
    with h5py.File(path, "a") as f:
        del f.attrs["format_version"]
        if value is not None:
            f.attrs["format_version"] = value
    read = formats_reader()["read_synthset_pixels"]
    if refused:
        with pytest.raises(ValueError, match="format_version"):
            read(path)
    else:
        assert read(path).shape == (6, 3, 4, 4)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        # where ddkd's own reader is strict, it agrees with the page
        if refused:
            with pytest.raises(DDKDError):
                ddkd.load_synthset(path)
        else:
            ddkd.load_synthset(path)


def test_unknown_members_are_ignored_by_both_readers(tmp_path):
    path = tmp_path / "tiny.h5"
    s, _ = _tiny_set(path, whitened=True)
    with h5py.File(path, "a") as f:
        f["future_member"] = np.zeros(3)
        f.attrs["future_attribute"] = "x"
        f["history/future_series"] = np.zeros(1, dtype=np.float32)
    np.testing.assert_allclose(formats_reader()["read_synthset_pixels"](path),
                               ddkd.load_synthset(path).pixels().numpy(), rtol=0, atol=1e-5)


def test_the_documented_reader_gives_the_pairs_of_a_set_with_views(tmp_path):
    """Version 2: the page's views (numpy) and pair order give what ddkd pre-trains on."""
    import dataclasses

    from ddkd.data.views import VIEWS

    s, _ = _tiny_set(tmp_path / "plain.h5", whitened=False)
    square = s.images[:, :, :4, :4].contiguous()  # (6, 3, 4, 4)
    views = tuple(VIEWS)  # every view the page documents
    gen = torch.Generator().manual_seed(1)
    viewed = dataclasses.replace(s, images=square,
                                 targets=torch.randn(6, len(views), 5, generator=gen),
                                 views=views)
    path = tmp_path / "viewed.h5"
    save_synthset(path, viewed)
    reader = formats_reader()
    x, y = reader["read_synthset_pairs"](path)
    ours_x, ours_y = ddkd.load_synthset(path).pairs()
    assert x.shape == (6 * len(views), 3, 4, 4) and y.shape == (6 * len(views), 5)
    np.testing.assert_array_equal(x, ours_x.numpy())
    np.testing.assert_array_equal(y, ours_y.numpy())
    assert set(reader["VIEWS"]) == set(VIEWS)
    # version 1: the images and targets as stored
    x1, y1 = reader["read_synthset_pairs"](SHIPPED)
    shipped = ddkd.load_synthset(SHIPPED)
    np.testing.assert_array_equal(x1, shipped.images.numpy())
    np.testing.assert_array_equal(y1, shipped.targets.numpy())
    np.testing.assert_allclose(reader["read_synthset_pixels"](path),
                               ddkd.load_synthset(path).pixels().numpy(), rtol=0, atol=1e-5)


def test_init_indices_index_the_full_training_split_as_documented():
    text = " ".join((DOCS / "formats.md").read_text().split())
    indices = ddkd.load_synthset(SHIPPED).init_indices
    lo, hi = int(indices.min()), int(indices.max())
    assert f"indices run from {lo} to {hi} although its run used 5000 of the 60,000" in text
    assert hi >= 5000  # so they cannot be positions in the run's 5000-image subset


# --- (c) the README is a front page -----------------------------------------------------------

RELATIVE_TIME = re.compile(
    r"\b(today|yesterday|tomorrow|tonight|now|recently|so far|(the )?day before|"
    r"(the )?day after|that day|the other day|this (morning|afternoon|evening|week|month|year)|"
    r"last (night|week|month|year)|next (week|month|year)|until (today|now))\b", re.I)
ISSUE_NUMBER = re.compile(r"\bissues? *#?\d+|(?<![\w&/])#\d+\b", re.I)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_speak_in_dates_not_relative_time_nor_issue_numbers(page):
    text = page.read_text()
    assert [m.group(0) for m in RELATIVE_TIME.finditer(" ".join(text.split()))] == []
    assert [m.group(0) for m in ISSUE_NUMBER.finditer(text)] == []


def test_the_readme_is_short_and_dates_its_measurements():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert re.search(r"measured\s+2026-\d\d-\d\d", text)
    # the Status paragraph agrees with the results: it no longer says the set loses
    assert "does not yet beat no pre-training" not in " ".join(text.split())
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", "ddkd teach",
                    "ddkd synthesize", "ddkd evaluate", "ddkd inspect"):
        assert command in text


def test_the_checks_catch_what_they_are_for():
    assert RELATIVE_TIME.search("the default until today") and RELATIVE_TIME.search(
        "measured the day before")
    assert ISSUE_NUMBER.search("as issue 7 asks") and ISSUE_NUMBER.search("see #12")
    assert not RELATIVE_TIME.search("measured 2026-11-29; knowledge") and not ISSUE_NUMBER.search(
        "ipc 10, 1000 images")


# --- (d) nothing points to the method reference outside the repository -----------------------


def _repository_files() -> list[Path]:
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    skip = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]


def test_no_file_outside_docs_points_to_the_external_method_reference():
    name = "METHOD" + ".md"  # spelt in two parts so that this file does not name it
    offenders = []
    for path in _repository_files():
        if path.is_relative_to(DOCS) or path.suffix in (".h5", ".png", ".pt"):
            continue
        try:
            if name in path.read_text(errors="ignore"):
                offenders.append(str(path.relative_to(ROOT)))
        except OSError:
            continue
    assert offenders == []


# --- links between the pages ---------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in _anchors(path), f"{page.name}: {target}"


def test_the_slug_matches_githubs():
    assert _slug("## `skd`: stagewise KD (Kulkarni, Patil & Karande, 2019)".lstrip("# ")) == (
        "skd-stagewise-kd-kulkarni-patil--karande-2019")
    assert _slug("Configuration: recipes and `--set`") == "configuration-recipes-and---set"
