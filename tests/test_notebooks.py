"""Every notebook in experiments/notebooks runs top to bottom, headless, at small size."""
import json
import pathlib

import nbformat
import numpy as np
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))
GOLDEN = ROOT / "tests" / "data" / "edm_ddpmpp_small.npz"


@pytest.fixture(scope="module")
def stand_in_files(tmp_path_factory):
    """Tiny local files in place of EDM's ImageNet-64 snapshot, pytorch-fid's Inception
    weights (random, same layout) and reference statistics; a workdir that the digits
    notebooks share (the second one resumes the first one's finished run)."""
    from test_inception import _random_fid_state_dict
    torch = pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("stand_ins")
    torch.save(_random_fid_state_dict(), tmp / "pt_inception-random.pth")
    np.savez(tmp / "reference.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with np.load(GOLDEN) as f:
        arch = json.loads(str(f["config_json"]))
    return {"DIFFLAX_NOTEBOOK_WORKDIR": str(tmp / "digits_run"), "DIFFLAX_EDM": str(GOLDEN), "DIFFLAX_EDM_ARCH": json.dumps(arch),
            "DIFFLAX_INCEPTION": str(tmp / "pt_inception-random.pth"),
            "DIFFLAX_FID_REFERENCE": str(tmp / "reference.npz")}


def test_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count")
                   for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, stand_in_files, monkeypatch):
    monkeypatch.setenv("DIFFLAX_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device: the kernel compiles less
    for key, value in stand_in_files.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Error" not in printed
