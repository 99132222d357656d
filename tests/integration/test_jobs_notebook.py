"""notebooks/07_batch_jobs.ipynb, executed cell by cell in the sPyNNaker kernel of a user's own server on a hub with
the job service: the unmodified nmpi client (pinned in kernels/spynnaker/requirements.txt) submits the synfire
script, follows it to `finished`, downloads its output file and plots it."""

from __future__ import annotations

from pathlib import Path

import nbformat

from test_jobs import start_jobs_hub

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "07_batch_jobs.ipynb"


def test_the_batch_jobs_tutorial_runs_in_the_spynnaker_kernel(hub_factory):
    hub = start_jobs_hub(hub_factory, {"limits": {"wall_time": 900, "output_mb": 64}})
    user = hub.client("jrosa", hub.add_user("jrosa"))
    user.start_server()
    try:
        kernel = user.start_kernel("spynnaker")
        said = []
        for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            out = user.execute(kernel, cell.source, timeout=1500)
            assert out["error"] is None, (cell.source[:200], out)
            said.append(out["stdout"])
        text = "\n".join(said)
        assert "Submitting as jrosa" in text
        assert "finished" in text and "synfire_spikes.csv:" in text, text
        assert ".cache" not in text, text  # caches the run wrote are not outputs
        assert "spikes per population:" in text, text  # the job's own output, from its log
        # Jobs run on a virtual board in this release: the file has its header and no spikes, and the tutorial
        # says why the raster is empty.
        assert "plotted 0 spikes - a virtual board records none" in text, text
    finally:
        user.stop_server()
