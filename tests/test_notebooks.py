"""Every notebook in experiments/notebooks runs top to bottom, headless, at small size, and
computes what it says: each one's last cell gathers its results in a dict `SUMMARY` that the
test reads back and checks (shapes exactly, metrics against what they must be)."""
import importlib.util
import json
import pathlib

import nbformat
import numpy as np
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))
NEEDS_DIFFUSERS = ("06_stable_diffusion", "07_pretrained_sit")  # stand-ins written by diffusers
GOLDEN = ROOT / "tests" / "data" / "edm_ddpmpp_small.npz"


@pytest.fixture(scope="module")
def stand_in_files(tmp_path_factory):
    """Tiny local files in place of EDM's ImageNet-64 snapshot, pytorch-fid's Inception
    weights (random, same layout) and reference statistics, and a Stable Diffusion folder
    (tiny random components, tests/sd_folders.py); a workdir that the digits notebooks share
    (the second one resumes the first one's finished run)."""
    from fid_stand_in import random_fid_state_dict
    from sd_folders import SIT_ARCH, save_sit_checkpoint, save_tiny_pipeline, save_tiny_vae
    torch = pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("stand_ins")
    torch.save(random_fid_state_dict(), tmp / "pt_inception-random.pth")
    save_sit_checkpoint(tmp / "sit.pt")
    if importlib.util.find_spec("diffusers"):  # only the SD and SiT notebooks need it
        save_tiny_pipeline(tmp / "sd", "epsilon")
        save_tiny_vae(tmp / "sit_vae", latent_channels=4)
    np.savez(tmp / "reference.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with np.load(GOLDEN) as f:
        arch = json.loads(str(f["config_json"]))
    return {"DIFFLAX_NOTEBOOK_WORKDIR": str(tmp / "digits_run"), "DIFFLAX_EDM": str(GOLDEN), "DIFFLAX_EDM_ARCH": json.dumps(arch),
            "DIFFLAX_INCEPTION": str(tmp / "pt_inception-random.pth"),
            "DIFFLAX_FID_REFERENCE": str(tmp / "reference.npz"), "DIFFLAX_SD_FOLDER": str(tmp / "sd"),
            "DIFFLAX_SIT_WEIGHTS": str(tmp / "sit.pt"), "DIFFLAX_SIT_VAE": str(tmp / "sit_vae"),
            "DIFFLAX_SIT_ARCH": json.dumps(SIT_ARCH)}


def test_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count")
                   for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, stand_in_files, monkeypatch):
    if path.stem in NEEDS_DIFFUSERS:
        pytest.importorskip("diffusers")
    monkeypatch.setenv("DIFFLAX_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device: the kernel compiles less
    for key, value in stand_in_files.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        'import json; print("SUMMARY=" + json.dumps(SUMMARY, default=float))'))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Error" not in printed
    summary = json.loads(printed.split("SUMMARY=")[-1])
    CHECKS[path.stem](summary)


def _sane(value, lo=0.0, hi=1e5):
    """A metric that was computed: finite and inside (lo, hi)."""
    return np.isfinite(value) and lo < value < hi


def _check_quickstart(s):
    assert s["sample_shape"] == [100, 16, 16, 1]
    # DEIS at 4 and 6 NFE; EDM Heun at 2 and 3 steps = 3 and 5 NFE, each with its own fd_digits
    assert sorted(s["fd_digits"]) == ["DEIS tAB3 4", "DEIS tAB3 6", "EDM Heun 3", "EDM Heun 5"]
    assert all(_sane(v) for v in s["fd_digits"].values()), s


def _check_pretrained(s):
    with np.load(GOLDEN) as f:
        arch = json.loads(str(f["config_json"]))
    r, c = arch["img_resolution"], arch["img_channels"]
    assert s["sample_shape"] == [16, r, r, c]
    assert all(_sane(v, hi=1e6) for v in s["fid"].values()), s
    assert s["fid"]["plain"] != s["fid"]["skip-tuned"], s  # skip scales change the samples


def _check_composing(s):
    plain, prop = s["DEIS tAB3"], s["+ encoder propagation"]
    assert (plain["full"], plain["partial"]) == (5, 0)  # 5 DEIS steps, all full
    assert prop["full"] + prop["partial"] == 5 and 0 < prop["partial"] < 5, s
    assert s["+ both"]["full"] == prop["full"]
    assert all(_sane(v["fd_digits"]) for v in s.values()), s


def _check_gmem(s):
    assert s["bank"] == [1797 - 180, 64]  # one snippet per training image, 64-d features
    assert _sane(s["final_loss"], hi=10.0), s
    assert s["sample_shape"] == [8, 16, 16, 1]


def _check_rectified_flow(s):
    assert s["pairs"] == {"noise": [64, 16, 16, 1], "samples": [64, 16, 16, 1], "labels": [64]}
    assert sorted(s["fd_digits_by_nfe"]) == ["1", "2"]
    assert all(_sane(v) for v in s["fd_digits_by_nfe"].values()), s
    assert s["sample_shape"] == [20, 16, 16, 1]


def _check_stable_diffusion(s):
    assert s["image_shape"] == [2, 16, 16, 3] and s["steps"] == 6
    assert s["full_plan_vs_plain"] == 0.0, s  # the full plan is the plain sampler
    assert s["calls"] == s["plan_cost_calls"], s  # counted while sampling = plan_cost's
    calls, encoder = s["calls"], s["encoder_runs"]
    assert calls["plain"] == calls["Skip-Tuning"] == calls["A-SDM student (pruned, untrained)"] == 6
    # key steps 0 and 3 (every=3): the encoder and mid block run twice; with parallel
    # decoding each key step is one storing call and one batched decode of its 3 steps
    assert calls["Faster Diffusion, parallel"] == 4
    assert encoder["Faster Diffusion"] == encoder["Faster Diffusion, parallel"] == 2
    assert encoder["DeepCache N=3"] == 2 and encoder["A-SDM inheritance"] == 3  # refresh 0, 3 / 0, 2, 4
    assert encoder["plain"] == 6
    for name in ("Faster Diffusion", "DeepCache N=3", "A-SDM inheritance", "Skip-Tuning",
                 "A-SDM student (pruned, untrained)"):
        assert s["change_from_plain"][name] > 1e-4, (name, s)


def _check_pretrained_sit(s):
    assert s["image_shape"] == [8, 16, 16, 3] and s["latent_shape"] == [8, 8, 8, 4]
    lo, hi = s["image_range"]
    assert 0.0 <= lo < hi <= 1.0, s
    assert s["change_with_guidance"] > 1e-3, s


CHECKS = {"01_quickstart": _check_quickstart, "02_pretrained_edm": _check_pretrained,
          "03_composing_accelerations": _check_composing, "04_gmem": _check_gmem,
          "05_rectified_flow": _check_rectified_flow, "06_stable_diffusion": _check_stable_diffusion,
          "07_pretrained_sit": _check_pretrained_sit}


def test_every_notebook_has_checks():
    assert sorted(CHECKS) == [p.stem for p in NOTEBOOKS]
