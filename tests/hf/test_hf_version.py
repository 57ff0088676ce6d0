"""The transformers range tpmoe.hf claims: one source (tpmoe/hf/version.py) for pyproject's extra,
the pinned release and the warning; a release outside it is one warning line, and a comparison row
of `tpmoe bench` that cannot be built (any cause) is one note while the rest of the table stands."""
import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest

from tpmoe.hf import version
import support

ROOT = Path(support.ROOT)


def _pinned_transformers() -> str:
    spec = importlib.util.spec_from_file_location("ensure_deps", ROOT / "tools" / "ensure_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEMO["transformers"] == module.TEST["transformers"], "demo and tests pin different releases"
    return module.TEST["transformers"]


def test_pyproject_extra_claims_the_tested_range():
    extra = re.search(r'^hf = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra, "pyproject.toml: no hf extra"
    assert f'"{version.TESTED_SPEC}"' in extra.group(1), (extra.group(1), version.TESTED_SPEC)


def test_the_pin_is_the_newest_release_of_the_range():
    pinned = version.release(_pinned_transformers())
    assert version.TESTED_MIN <= pinned < version.TESTED_BELOW
    assert (pinned[0], pinned[1] + 1) == version.TESTED_BELOW, (pinned, version.TESTED_BELOW)


@pytest.mark.parametrize("release, inside", [("5.24.0", True), ("5.25.0", True), ("5.25.1.dev0", True),
                                             ("5.23.2", False), ("5.26.0", False), ("6.0.0", False),
                                             ("4.57.1", False), ("garbage", False)])
def test_untested_message(release, inside):
    message = version.untested_message(release)
    if inside:
        assert message is None
    else:
        assert message is not None and "\n" not in message
        assert version.TESTED_SPEC in message and release in message, message


def test_a_release_outside_the_range_warns_once(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from tpmoe.hf.swap import require_transformers
    version.warn_if_untested.cache_clear()
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        require_transformers()
        require_transformers()
    version.warn_if_untested.cache_clear()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and version.TESTED_SPEC in messages[0], messages


def test_a_comparison_row_that_cannot_be_built_is_a_note(monkeypatch, tmp_path, capsys):
    """Any error building an HF comparison block (here a RuntimeError, as transformers 5.25's
    changed LongCat gave) is one note line; tpmoe's row and the yardsticks stand."""
    pytest.importorskip("transformers")
    import tpmoe.cli.hf_blocks
    from tpmoe.cli import main

    def broken(*args, **kwargs):
        raise NotImplementedError("Cannot copy out of meta tensor; no data!\nsecond line")
    monkeypatch.setattr(tpmoe.cli.hf_blocks, "make_hf_block", broken)
    out = tmp_path / "rows.json"
    assert main(["bench", "--preset", "tiny", "--tokens", "1", "--world-size", "1", "--repeats", "3",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    err = captured.out + captured.err  # notes go beside the progress bar (tqdm writes them to stdout)
    notes = [line.strip() for line in err.splitlines() if line.strip().startswith("note: hf_")]
    assert sorted(notes) == ["note: hf_eager: skipped (NotImplementedError: Cannot copy out of meta tensor; no data!)",
                             "note: hf_grouped_mm: skipped (NotImplementedError: Cannot copy out of meta tensor; "
                             "no data!)"], err
    impls = {row["impl"] for row in json.loads(out.read_text())["rows"]}
    assert impls == {"tpmoe", "dense", "floor"}, impls
