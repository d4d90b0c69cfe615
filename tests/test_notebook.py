"""Execute the quickstart notebook top to bottom with nbclient, as "Run all" does on a machine without a GPU: the GPU
section's cells (tagged "gpu", starting with the notebook's `%%gpu` magic) skip themselves with a note."""

import ast
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient


NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "vaopd_quickstart.ipynb"
GPU_TAG = "gpu"
GPU_MAGIC = "%%gpu\n"
SKIPPED = "Skipped: this cell needs a CUDA GPU"


def _tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


@pytest.fixture
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_clean(notebook):
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs"
    gpu_cells = [cell for cell in notebook.cells if GPU_TAG in _tags(cell)]
    assert gpu_cells, "the Qwen3-VL section must be tagged 'gpu'"
    for cell in gpu_cells:
        assert cell.source.startswith(GPU_MAGIC), "a GPU cell must skip itself without a GPU"
        ast.parse(cell.source.removeprefix(GPU_MAGIC))  # not run here, but at least valid Python
    assert "Qwen/Qwen3-VL-2B-Instruct" in "".join(c.source for c in gpu_cells)
    # The GPU section comes last: everything before it must run without a GPU
    first_gpu = next(i for i, cell in enumerate(notebook.cells) if GPU_TAG in _tags(cell))
    assert all(GPU_TAG in _tags(c) for c in notebook.cells[first_gpu:] if c.cell_type == "code")


def test_notebook_runs_top_to_bottom_without_a_gpu(notebook, tmp_path, monkeypatch):
    # Run the kernel on this interpreter (the project's environment) whatever kernelspecs the machine has:
    # JUPYTER_PATH is searched before the user and system kernel directories
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (trl_vaopd tests)",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the kernel sees no GPU, as on a laptop

    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    print(f"the notebook without a GPU: {elapsed:.1f} s")

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    for cell in notebook.cells:
        if GPU_TAG in _tags(cell):
            assert [o.get("text", "") for o in cell.outputs] == [f"{SKIPPED} (everything above runs without one).\n"]
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert sum("image/png" in o.data for o in shown) >= 4  # the views, the trajectory, the heatmap, the curve
    heatmap_html = [o.data["text/html"] for o in shown if "va-heatmap" in o.data.get("text/html", "")]
    assert len(heatmap_html) == 1 and all(name in heatmap_html[0] for name in ("base student", "VA-OPD student"))
    metrics = "".join(o.data.get("text/html", "") for o in shown)
    for key in ("va/mean", "va/top10_share", "weights/max", "kl/high", "visual_reliance/student"):
        assert key in metrics, key
