"""JupyterHub config for a SpiNNaker Jupyter deployment. Thin on purpose: everything comes from the deployment
config file(s) named in $SPINNAKER_JUPYTER_CONFIG; operators' own additions go in jupyterhub_config.d/*.py beside
the last config file (loaded last, so they win; refused when another account could have written them)."""

import signal
from pathlib import Path

from spinnaker_jupyter import config, hubconfig, preflight, spawner, upstream

c = get_config()  # noqa: F821 - provided by JupyterHub

# A hub started in the background (`make up &`, a script) inherits an ignored SIGINT, and so would the services it
# starts before it installs its own handlers; it stops them with SIGINT and waits 30 s for each (the idle culler)
# before SIGTERM. The hub answers SIGINT itself anyway (JupyterHub.init_signal): restore it before anything starts.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

upstream.bound_the_shutdown()  # a stopping hub ends, whatever task ignores its cancel
upstream.watch_services_every()  # a dead job service is back within seconds

deployment = config.load()
extras = preflight.trusted_config(deployment)  # they run inside the hub: refused if another account could write them
hubconfig.apply(c, deployment)

for extra in extras:
    exec(compile(Path(extra).read_text(), str(extra), "exec"), {"c": c, "get_config": lambda: c})

spawner.launch_fork_server_with_the_hub(c)  # (after the operator's files: they may change the spawner)
