"""JupyterHub config for a SpiNNaker Jupyter deployment. Thin on purpose: everything comes from the deployment
config file(s) named in $SPINNAKER_JUPYTER_CONFIG; operators' own additions go in jupyterhub_config.d/*.py beside
the first config file (loaded last, so they win)."""

from pathlib import Path

from spinnaker_jupyter import config, hubconfig

c = get_config()  # noqa: F821 - provided by JupyterHub

deployment = config.load()
hubconfig.apply(c, deployment)

for extra in sorted((deployment.base_dir / "jupyterhub_config.d").glob("*.py")):
    exec(compile(Path(extra).read_text(), str(extra), "exec"), {"c": c, "get_config": lambda: c})
