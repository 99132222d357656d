"""The tutorial notebooks (notebooks/*.ipynb): stored clean, and executed in the "sPyNNaker" kernel.

Every notebook is run top to bottom with testbook in the kernel named ``spynnaker`` in virtual mode, from a
copy in a fresh directory (so that sPyNNaker's ./reports lands there), and the test then checks what the
notebook teaches. A cell that raises fails the test.

Cells tagged ``plots-recorded-data`` print an explanation in virtual mode instead of drawing an empty plot.
After each of them has run, the test runs it once more with ``VIRTUAL_MODE = False`` to check that the
real-machine branch draws a figure (from the empty virtual data), and then restores ``VIRTUAL_MODE``.

The session fixture ``spynnaker_kernel`` comes from tests/conftest.py. It makes the kernelspec
``spynnaker`` visible (via ``JUPYTER_PATH``), configured for virtual mode, and yields the working
directory under which the notebooks are run.
"""

import copy
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
from testbook import testbook

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = [
    "01_getting_started.ipynb",
    "02_populations.ipynb",
    "03_running_and_results.ipynb",
    "04_projections.ipynb",
    "05_plasticity_stdp.ipynb",
    "06_live_io.ipynb",
    "SynfireExample.ipynb",
]
# Tutorials that need the hub's job service: executed through a real hub in tests/integration/test_jobs_notebook.py.
SERVICE_NOTEBOOKS = ["07_batch_jobs.ipynb"]
KERNEL_NAME = "spynnaker"
MACHINE_TAG = "needs-spinnaker-machine"
PLOT_TAG = "plots-recorded-data"
DETECTION = 'VIRTUAL_MODE = get_config_bool("Machine", "virtual_board")'
GUARD = "if VIRTUAL_MODE:"
CELL_TIMEOUT = 600  # seconds for one cell; the whole suite normally takes about 1.5 minutes

# Which notebooks have cells that need a real machine, and how many.
EXPECTED_MACHINE_CELLS = {"03_running_and_results.ipynb": 1, "06_live_io.ipynb": 2}


def read(name):
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def stdout(outputs):
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")


def has_image(outputs):
    return any(
        "image/png" in o.get("data", {}) for o in outputs if o.get("output_type") in ("display_data", "execute_result")
    )


# --------------------------------------------------------------------------------------------------
# Static checks: no kernel needed
# --------------------------------------------------------------------------------------------------


def test_the_expected_notebooks_are_there():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS + SERVICE_NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS + SERVICE_NOTEBOOKS)
def test_stored_without_outputs_for_the_spynnaker_kernel(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == KERNEL_NAME
    assert nb.metadata["kernelspec"]["display_name"] == "sPyNNaker"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"stored output in {name}: {cell.source[:60]!r}"
            assert cell.execution_count is None, f"stored execution count in {name}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_virtual_mode_is_detected_right_after_setup(name):
    code = [c.source for c in read(name).cells if c.cell_type == "code"]
    detection = [i for i, src in enumerate(code) if DETECTION in src]
    assert len(detection) == 1, "one detection cell"
    assert detection[0] > 0 and "p.setup(" in code[detection[0] - 1], "right after a setup() cell"
    # Every use of the flag comes after the detection cell.
    for i, src in enumerate(code):
        if "VIRTUAL_MODE" in src:
            assert i >= detection[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_machine_cells_are_tagged_guarded_and_explained(name):
    cells = read(name).cells
    machine_cells = [i for i, c in enumerate(cells) if MACHINE_TAG in tags(c)]
    assert len(machine_cells) == EXPECTED_MACHINE_CELLS.get(name, 0)
    for i in machine_cells:
        cell = cells[i]
        assert cell.cell_type == "code"
        assert GUARD in cell.source, "the notebook itself must skip this cell in virtual mode"
        assert "needs a real SpiNNaker machine" in cell.source
        markdown = [c for c in cells[:i] if c.cell_type == "markdown"][-1]
        assert "needs a real SpiNNaker machine" in markdown.source, (
            "the markdown cell before a machine-only cell must say so"
        )
    # Whatever talks to a running board lives in a tagged cell.
    for cell in cells:
        if cell.cell_type == "code" and any(
            word in cell.source for word in ("SpynnakerLiveSpikesConnection(", "SpynnakerPoissonControlConnection(")
        ):
            assert MACHINE_TAG in tags(cell)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_plots_of_recorded_data_have_a_virtual_mode_branch(name):
    for cell in read(name).cells:
        if PLOT_TAG in tags(cell):
            assert GUARD in cell.source
            assert "Virtual mode: no plot." in cell.source


# --------------------------------------------------------------------------------------------------
# Executing the notebooks
# --------------------------------------------------------------------------------------------------


def _workdir(fixture_value):
    """The working directory the conftest fixture provides (a path, or an object with .workdir/.cwd)."""
    for attribute in ("workdir", "cwd"):
        if hasattr(fixture_value, attribute):
            return Path(getattr(fixture_value, attribute))
    return Path(os.fspath(fixture_value))


class Executed:
    """A notebook executed in virtual mode; the kernel is still alive for queries."""

    def __init__(self, tb, virtual_outputs, forced_outputs):
        self.tb = tb
        self.cells = tb.nb.cells
        self.virtual_outputs = virtual_outputs  # cell index -> outputs of the virtual-mode run
        self.forced_outputs = forced_outputs  # cell index -> outputs with VIRTUAL_MODE forced False

    def value(self, expression):
        return self.tb.value(expression)

    def index(self, snippet):
        matches = [i for i, c in enumerate(self.cells) if c.cell_type == "code" and snippet in c.source]
        assert len(matches) == 1, f"{snippet!r} matches cells {matches}"
        return matches[0]

    def out(self, snippet):
        return stdout(self.virtual_outputs[self.index(snippet)])

    def check_virtual_mode_cells(self):
        assert self.value("VIRTUAL_MODE") is True, "the tests must run in virtual mode"
        for i, cell in enumerate(self.cells):
            if MACHINE_TAG in tags(cell):
                text = stdout(self.virtual_outputs[i])
                assert "Skipped in virtual mode" in text and "needs a real SpiNNaker machine" in text
            if PLOT_TAG in tags(cell):
                assert "Virtual mode: no plot." in stdout(self.virtual_outputs[i])
                assert not has_image(self.virtual_outputs[i]), "no empty plot in virtual mode"
                assert has_image(self.forced_outputs[i]), "the real-machine branch of a plot cell must draw a figure"


@contextmanager
def executed(name, spynnaker_kernel):
    """Run a copy of the notebook, cell by cell, in a fresh directory under the fixture's workdir."""
    rundir = Path(tempfile.mkdtemp(prefix=Path(name).stem + "-", dir=_workdir(spynnaker_kernel)))
    copied = rundir / name
    shutil.copy(NOTEBOOKS_DIR / name, copied)
    virtual_outputs, forced_outputs = {}, {}
    with testbook(
        str(copied),
        execute=False,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(rundir)}},
    ) as tb:
        for i, cell in enumerate(tb.nb.cells):
            if cell.cell_type != "code":
                continue
            tb.execute_cell(i)  # raises (and so fails the test) if the cell raises
            virtual_outputs[i] = copy.deepcopy(cell.outputs)
            if PLOT_TAG in tags(cell):
                tb.inject("VIRTUAL_MODE = False", pop=True)
                try:
                    tb.execute_cell(i)
                    forced_outputs[i] = copy.deepcopy(cell.outputs)
                finally:
                    tb.inject("VIRTUAL_MODE = True", pop=True)
        yield Executed(tb, virtual_outputs, forced_outputs)


def test_01_getting_started(spynnaker_kernel):
    with executed("01_getting_started.ipynb", spynnaker_kernel) as nb:
        nb.check_virtual_mode_cells()
        assert "Virtual mode" in nb.out(DETECTION)

        # The machine the tools mapped onto.
        assert nb.value("chip.n_processors") == 18
        assert nb.value("chip.sdram") > 100 * 2**20
        assert nb.value("machine.n_chips") >= 1

        # Cores per population: 256 neurons per core by default, fewer on request.
        assert nb.value("used") == {"excitatory": 4, "inhibitory": 1}
        assert nb.value("cores_100_per_core") == {"excitatory": 10, "inhibitory": 1}

        # Delays: on the core, with a delay extension, refused at run().
        assert nb.value("cores_delay_50") == {"source": 1, "target": 1}
        assert nb.value("cores_delay_100") == {"source": 1, "target": 1, "source_delayed": 1}
        delay_error = nb.value("delay_error")
        assert delay_error and "600" in delay_error and "576" in delay_error
        assert "sPyNNaker refused the model" in nb.out("build_delay_model(600.0)")
        assert delay_error in nb.out("build_delay_model(600.0)")

        # Plastic synapses: rows too long for one core of 256 neurons, fine with 128.
        assert nb.value("cores_static") == {"sources": 1, "neurons": 1}
        plastic_error = nb.value("plastic_error")
        assert plastic_error and "254" in plastic_error
        assert nb.value("cores_plastic_128") == {"sources": 1, "neurons": 2}


def test_02_populations(spynnaker_kernel):
    with executed("02_populations.ipynb", spynnaker_kernel) as nb:
        nb.check_virtual_mode_cells()
        assert nb.value("fine_timestep") == pytest.approx(0.1)

        populations = nb.value(
            "{pop.label: [pop.size, type(pop.celltype).__name__] for pop in "
            "[pop_1, pop_2, lif_curr, lif_cond, izhikevich, array_source, poisson_source]}"
        )
        assert populations == {
            "Fred": [4, "IFCurrExpBase"],
            "Bob": [2, "IFCurrExpBase"],
            "lif_curr": [10, "IFCurrExpBase"],
            "lif_cond": [10, "IFCondExpBase"],
            "izhikevich": [10, "IzkCurrExpBase"],
            "array_source": [3, "SpikeSourceArray"],
            "poisson_source": [20, "SpikeSourcePoisson"],
        }
        assert nb.value("list(izhikevich.get('d'))") == [8.0] * 10
        assert nb.value("[[float(t) for t in times] for times in array_source.get('spike_times')]") == [
            [10.0, 20.0, 30.0],
            [15.0],
            [50.0, 60.0],
        ]

        # initialize with one value, and with a RandomDistribution (kept as such until the run).
        assert nb.value("initial_v_fixed") == [-60.0] * 4
        assert nb.value("[type(v).__name__ for v in initial_v_random]") == ["RandomDistribution"] * 10
        assert nb.value("[initial_v_random[0].name, initial_v_random[0].parameters]") == [
            "uniform",
            {"low": -65.0, "high": -55.0},
        ]
        assert "simulated time: 100.0 ms" in nb.out("p.run(100)")


def test_03_running_and_results(spynnaker_kernel):
    with executed("03_running_and_results.ipynb", spynnaker_kernel) as nb:
        nb.check_virtual_mode_cells()
        # Two segments: the first run, and the run after reset().
        assert nb.value("n_segments") == 2
        assert nb.value("i_offset_after_reset") == [2.0] * 4
        assert nb.value("[[s.name for s in seg.analogsignals] for seg in data.segments]") == [["v"], ["v"]]
        assert nb.value("[len(seg.spiketrains) for seg in data.segments]") == [4, 4]
        # A (time x neurons) signal; virtual mode gives no samples, which is why nothing is plotted.
        assert nb.value("[list(seg.analogsignals[0].shape) for seg in data.segments]") == [[0, 4], [0, 4]]
        assert "spike trains: 4 (one per neuron)" in nb.out("spikes = data.segments[0].spiketrains")


def test_04_projections(spynnaker_kernel):
    with executed("04_projections.ipynb", spynnaker_kernel) as nb:
        nb.check_virtual_mode_cells()
        counts = nb.value("n_connections")
        assert counts["OneToOne"] == 20
        assert counts["AllToAll"] == 400
        assert 5 <= counts["FixedProbability 0.1"] <= 90  # binomial(400, 0.1)
        assert 120 <= counts["FixedProbability 0.5"] <= 280  # binomial(400, 0.5)
        assert counts["FixedTotalNumber 5"] == 5
        assert counts["FromList"] == 4
        assert counts["FromList with weights"] == 2
        assert nb.value("len(proj_excitatory.get('weight', 'list'))") == 20
        assert nb.value("len(proj_inhibitory.get('weight', 'list'))") == 20
        assert 80 <= nb.value("len(proj_conductance.get('weight', 'list'))") <= 320

        # As a list: (pre, post, weight, delay).
        from_list = nb.value("[[int(a), int(b), float(w), float(d)] for a, b, w, d in synapses]")
        assert [row[:2] for row in from_list] == [[1, 1], [2, 1], [3, 2], [4, 2]]
        assert all(math.isclose(w, 0.5, abs_tol=1e-3) and d == 1.0 for _, _, w, d in from_list)
        weighted = nb.value(
            "[[int(a), int(b), float(w), float(d)] "
            "for a, b, w, d in proj_from_list_weighted.get(['weight', 'delay'], 'list')]"
        )
        assert [row[:2] for row in weighted] == [[0, 5], [1, 6]]
        assert [row[2] for row in weighted] == pytest.approx([0.3, 0.4], abs=1e-3)
        assert [row[3] for row in weighted] == [2.0, 3.0]

        # As an array: pre x post, nan where not connected.
        assert nb.value("list(weights_array.shape)") == [20, 20]
        assert nb.value("int((~np.isnan(weights_array)).sum())") == counts["FixedProbability 0.1"]
        assert nb.value("int(np.isnan(weights_one_to_one).sum())") == 380
        assert nb.value("np.diag(weights_one_to_one).tolist()") == pytest.approx([1.0] * 20, abs=1e-3)
        assert nb.value("np.diag(delays_one_to_one).tolist()") == [2.0] * 20

        # Random weights and delays.
        weights = nb.value("{name: values.tolist() for name, values in random_weights.items()}")
        normal, clipped, boundary = (weights[k] for k in ("normal", "normal_clipped", "normal_clipped_to_boundary"))
        assert len(normal) == len(clipped) == len(boundary) == 400
        assert min(normal) > 0 and 0.45 < sum(normal) / 400 < 0.55
        for values in (clipped, boundary):
            assert 0.2 - 1e-3 <= min(values) and max(values) <= 0.8 + 1e-3

        def at(values, bound):
            return sum(abs(v - bound) < 1e-3 for v in values)

        # Clipping to the boundary piles values up at 0.2 and 0.8; clipping by redrawing does not.
        assert at(boundary, 0.2) >= 5 and at(boundary, 0.8) >= 5
        assert at(clipped, 0.2) + at(clipped, 0.8) <= 10
        delays = nb.value("random_delays.tolist()")
        assert len(delays) == 400
        assert min(delays) >= 1.0 and max(delays) <= 10.0
        assert all(d == int(d) for d in delays), "delays are whole timesteps"
        assert len(set(delays)) > 3

        # The weight histograms show real (built) weights, so they are drawn in virtual mode too.
        assert has_image(nb.virtual_outputs[nb.index("axis.hist(values, bins=30)")])


def test_05_plasticity_stdp(spynnaker_kernel):
    with executed("05_plasticity_stdp.ipynb", spynnaker_kernel) as nb:
        nb.check_virtual_mode_cells()
        for name, weight_dependence in (
            ("stdp_additive", "WeightDependenceAdditive"),
            ("stdp_multiplicative", "WeightDependenceMultiplicative"),
        ):
            timing = nb.value(
                f"[type({name}.timing_dependence).__name__, {name}.timing_dependence.tau_plus, "
                f"{name}.timing_dependence.tau_minus, {name}.timing_dependence.A_plus, "
                f"{name}.timing_dependence.A_minus]"
            )
            assert timing == ["TimingDependenceSpikePair", 20.0, 20.0, pytest.approx(0.01), pytest.approx(0.012)]
            weights = nb.value(
                f"[type({name}.weight_dependence).__name__, "
                f"{name}.weight_dependence.w_min, {name}.weight_dependence.w_max]"
            )
            assert weights == [weight_dependence, 0.0, 1.0]
            assert nb.value(f"[{name}.weight, {name}.delay]") == [0.5, 2.0]

        for array in ("weights_additive", "weights_multiplicative"):
            assert nb.value(f"list({array}.shape)") == [20, 20]
            assert nb.value(f"int(np.isnan({array}).sum())") == 0
            low, high = nb.value(f"[float({array}.min()), float({array}.max())]")
            assert 0.0 <= low <= high <= 1.0
            # Virtual mode: nothing ran, so nothing was learned.
            assert low == pytest.approx(0.5, abs=1e-3) and high == pytest.approx(0.5, abs=1e-3)
        assert nb.value("sorted({int(d) for d in np.array(proj_additive.get('delay', 'list'))[:, 2]})") == [2]


def test_06_live_io(spynnaker_kernel):
    with executed("06_live_io.ipynb", spynnaker_kernel) as nb:
        nb.check_virtual_mode_cells()
        assert nb.value("live_connection is None and rate_connection is None") is True
        assert nb.value("received_spikes") == []
        mapped = nb.value("mapped")
        assert {label: mapped.get(label) for label in ("injector", "input", "pop")} == {
            "injector": 1,
            "input": 1,
            "pop": 1,
        }
        # ... plus the cores sPyNNaker adds for live output and for live rate control.
        assert len(mapped) >= 5


def test_synfire_example(spynnaker_kernel):
    with executed("SynfireExample.ipynb", spynnaker_kernel) as nb:
        nb.check_virtual_mode_cells()
        assert nb.value("[n_neurons, n_populations, weights, delays, simtime]") == [100, 10, 0.5, 17.0, 1000]
        assert nb.value("[[pop.label, pop.size] for pop in chain_pops]") == [[f"chain_{i}", 100] for i in range(10)]
        assert nb.value("len(chain_projections)") == 10
        # FixedNumberPreConnector(10): 10 inputs for each of the 100 neurons of the next population.
        assert nb.value("list(connections.shape)") == [1000, 4]
        assert nb.value("sorted({round(float(w), 3) for w in connections[:, 2]})") == [0.5]
        assert nb.value("sorted({float(d) for d in connections[:, 3]})") == [17.0]
        pre_post = nb.value("[[p_.pre.label, p_.post.label] for p_ in chain_projections]")
        assert pre_post == [[f"chain_{i}", f"chain_{(i + 1) % 10}"] for i in range(10)]
        assert nb.value("n_spikes") == [0] * 10  # virtual mode records nothing
