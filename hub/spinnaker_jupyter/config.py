"""Load the deployment config: built-in defaults, then the operator's files in order, then secrets from the
environment or secret files. Anything wrong stops here, with the key's path and what was expected.
The secret files and the refusal of secrets written into the config are config_secrets.py."""

from __future__ import annotations

import copy
import difflib
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config_error import ConfigError
from .config_secrets import (
    check_length,
    read_secret_file,
    read_text,
    redacted,  # noqa: F401 (cli.py's `config show` reads it from here)
    reject_inline_secrets,
    write_secret,
)
from .schema import SCHEMA, defaults
from .singleuser import SKIPPED_IMPORTS

# jsonschema's optional "iri" format checker imports rfc3987_syntax, which compiles a lark grammar at import (seconds
# at every command); the schema checks no format, so that module is marked absent first (singleuser.py says more).
for _name in SKIPPED_IMPORTS:
    sys.modules.setdefault(_name, None)
import jsonschema  # noqa: E402

PROJECT_ROOT = Path(os.environ.get("SPINNAKER_JUPYTER_ROOT", Path(__file__).resolve().parents[2]))
CONFIG_ENV = "SPINNAKER_JUPYTER_CONFIG"  # os.pathsep-separated config files, for jupyterhub_config.py
BASE_DIR_ENV = "SPINNAKER_JUPYTER_BASE_DIR"  # where relative paths start without a config file (set by `up`)


@dataclass
class Deployment:
    """The validated config plus the paths and secrets derived from it."""

    values: dict
    files: list[Path] = field(default_factory=list)

    def __getitem__(self, key):
        return self.values[key]

    @property
    def base_dir(self) -> Path:
        if self.files:
            return self.files[-1].parent
        return Path(os.environ.get(BASE_DIR_ENV) or Path.cwd()).resolve()

    def path(self, value: str | None, default: Path) -> Path:
        if not value:
            return default
        p = Path(value).expanduser()
        return (p if p.is_absolute() else self.base_dir / p).resolve()

    @property
    def data_dir(self) -> Path:
        return self.path(self.values["data_dir"], self.base_dir / "data")

    @property
    def hub_dir(self) -> Path:
        return self.data_dir / "hub"

    @property
    def homes_dir(self) -> Path:
        return self.data_dir / "homes"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def envs_dir(self) -> Path:
        return self.path(self.values["kernels"]["envs_dir"], self.data_dir / "envs")

    @property
    def share_dir(self) -> Path:
        """Goes on the user servers' JUPYTER_PATH: holds the shared kernelspecs."""
        return self.data_dir / "share" / "jupyter"

    @property
    def spynnaker_cfg_dir(self) -> Path:
        return self.data_dir / "etc" / "spynnaker"

    @property
    def tutorials_dir(self) -> Path:
        return self.path(self.values["tutorials"]["source"], PROJECT_ROOT / "notebooks")

    @property
    def accounts_file(self) -> Path:
        return self.hub_dir / "accounts.json"

    def secret(self, name: str) -> str:
        """A secret the hub generates and keeps (0600) when the operator gives none."""
        env = {"proxy_auth_token": "CONFIGPROXY_AUTH_TOKEN", "crypt_key": "JUPYTERHUB_CRYPT_KEY"}[name]
        if os.environ.get(env):
            value, where = os.environ[env].strip(), env
            fix = f"set {env} to the output of `openssl rand -hex 32`, or unset it to have one generated"
        else:
            path = self.hub_dir / name
            if not path.exists():
                self.private_hub_dir()
                write_secret(path, secrets.token_hex(32))
            from .preflight import trusted

            trusted(path, "secret file", private=True)
            value, where = read_text(path, name).strip(), str(path)
            fix = f"remove {path} and start again to generate a new one (or set {env})"
        check_length(value, where, fix)
        if name == "crypt_key" and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ConfigError(
                f"{where}: the key that encrypts users' tokens must be 64 hexadecimal characters (32 "
                f"bytes). Fix: {fix}."
            )
        return value

    def private_hub_dir(self) -> Path:
        """data_dir/hub, made private (0700) when this creates it; one made by another account is refused."""
        from .preflight import trusted

        for path in (self.data_dir, self.hub_dir):
            if path.exists() and not path.is_dir():
                raise ConfigError(
                    f"data_dir: {path} is a file, not a folder. Set data_dir to a folder (it is "
                    "created when missing) or move the file away"
                )
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.hub_dir.mkdir(mode=0o700)
            os.chmod(self.hub_dir, 0o700)  # whatever the umask; only a folder made here
        except FileExistsError:
            pass
        except OSError as e:
            raise ConfigError(
                f"data_dir: cannot create {self.hub_dir}: {e.strerror}. Set data_dir to a folder this account can write"
            ) from None
        trusted(self.hub_dir, "data_dir/hub", private=True)
        return self.hub_dir

    @property
    def db_url(self) -> str:
        return (
            os.environ.get("SPINNAKER_JUPYTER_DB_URL")
            or self.values["hub"]["db_url"]
            or f"sqlite:///{self.hub_dir / 'jupyterhub.sqlite'}"
        )

    def ebrains_client_secret(self) -> str:
        eb = self.values["auth"]["ebrains"]
        if os.environ.get("EBRAINS_CLIENT_SECRET"):
            return os.environ["EBRAINS_CLIENT_SECRET"]
        if eb["client_secret_file"]:
            return read_secret_file(
                self.path(eb["client_secret_file"], Path()), "auth.ebrains.client_secret_file", "EBRAINS_CLIENT_SECRET"
            )
        raise ConfigError(
            "auth.ebrains.client_secret: missing. Set the environment variable EBRAINS_CLIENT_SECRET "
            "or auth.ebrains.client_secret_file (a file readable only by the hub)."
        )

    def spalloc_token(self) -> str:
        """The hub's bearer token for the spalloc service (mode `session`); read again at each session renewal."""
        if os.environ.get("SPALLOC_TOKEN"):
            return os.environ["SPALLOC_TOKEN"].strip()
        token_file = self.values["spinnaker"]["spalloc"]["token_file"]
        if token_file:
            return read_secret_file(self.path(token_file, Path()), "spinnaker.spalloc.token_file", "SPALLOC_TOKEN")
        raise ConfigError(
            "spinnaker.spalloc.token: missing. Set the environment variable SPALLOC_TOKEN or "
            "spinnaker.spalloc.token_file (a file readable only by the hub)."
        )


def merge(base: dict, over: dict) -> dict:
    """Deep-merge `over` into a copy of `base`; lists and scalars replace."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _describe_type(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    t = schema.get("type", "a value")
    return " or ".join(t) if isinstance(t, list) else t


def _format_error(err: jsonschema.ValidationError, source: str) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    where = f" (in {source})" if source else ""
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        unknown = sorted(set(err.instance) - set(allowed))
        lines = []
        for key in unknown:
            full = f"{path}.{key}" if err.absolute_path else key
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"{full}: unknown key{hint} Allowed here: {', '.join(allowed)}{where}")
        return "\n".join(lines)
    if err.validator == "type":
        return f"{path}: expected {_describe_type(err.schema)}, got {err.instance!r}{where}"
    if err.validator == "enum":
        return f"{path}: expected {_describe_type(err.schema)}, got {err.instance!r}{where}"
    if err.validator == "pattern" and err.schema.get("errorMessage"):  # the schema's words, not its regex
        return f"{path}: expected {err.schema['errorMessage']}, got {err.instance!r}{where}"
    return f"{path}: {err.message}{where}"


def validate(values: dict, source: str = "") -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(values), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("\n".join(_format_error(e, source) for e in errors))


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases (`*name`): a few hundred bytes of nested aliases expand to billions of nodes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in the config file; write the value out",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


def read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)
    except yaml.MarkedYAMLError as e:  # one line: where, and what is wrong there
        mark = e.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path}{where} is not valid YAML: {'; '.join(filter(None, (e.context, e.problem)))}"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def load(files: list[str | Path] | None = None) -> Deployment:
    """Defaults, then each file in order (later wins). Each file is checked on its own so errors name it."""
    if files is None:
        files = [f for f in os.environ.get(CONFIG_ENV, "").split(os.pathsep) if f]
    paths = [Path(f).expanduser().resolve() for f in files]
    values = defaults()
    for path in paths:
        data = read_file(path)
        reject_inline_secrets(data)
        values = merge(values, data)
        validate(values, str(path))
    validate(values)
    deployment = Deployment(values, paths)
    _check_consistency(deployment)
    return deployment


def _check_consistency(d: Deployment) -> None:
    """Rules that span keys, which the schema cannot say."""
    v = d.values
    if v["spinnaker"]["mode"] == "machine" and not v["spinnaker"]["machine_name"]:
        raise ConfigError(
            "spinnaker.machine_name: required when spinnaker.mode is 'machine' (the board's host name or IP address)"
        )
    _check_spinnaker(d)
    from .uid_range import machine_uid_range_problem  # the accounts' uids: the deployment's own, on this machine

    local = v["spawner"]["local"]
    if problem := machine_uid_range_problem(local["uid_range"], local["uid_range_in_login_range"]):
        raise ConfigError(problem)
    from .kernels import releases  # the sPyNNaker releases: versions differ, requirements files exist

    releases(d)
    from .tls import check as check_tls  # HTTPS files: present, PEM, the key private

    check_tls(d)
    if v["auth"]["type"] == "ebrains":
        eb = v["auth"]["ebrains"]
        if not eb["client_id"]:
            raise ConfigError("auth.ebrains.client_id: required when auth.type is 'ebrains'")
        d.ebrains_client_secret()
        if not (
            eb["allow_all"]
            or eb["allowed_groups"]
            or eb["allowed_users"]
            or eb["allowed_collabs"]
            or eb["admin_collabs"]
        ):
            raise ConfigError(
                "auth.ebrains: nobody would be admitted. Set allowed_groups, allowed_collabs, "
                "allowed_users or allow_all: true"
            )
        from .collabs import config_problem

        if problem := config_problem(eb):
            raise ConfigError(problem)
        if eb["auth_refresh_age"] >= eb["refresh_margin"]:
            raise ConfigError(
                "auth.ebrains.auth_refresh_age must be smaller than auth.ebrains.refresh_margin, or "
                "notebooks could be handed an access token about to expire"
            )
    if v["drive"]["enabled"] and v["auth"]["type"] != "ebrains":
        raise ConfigError(
            "drive.enabled: the Drive is reached with each user's EBRAINS login; set auth.type: "
            "ebrains, or drive.enabled: false"
        )
    ports = {
        "hub.port": v["hub"]["port"],
        "proxy.api_port": v["proxy"]["api_port"],
        "proxy.hub_port": v["proxy"]["hub_port"],
    }
    if v["auth"]["type"] == "ebrains":
        ports["auth.ebrains.token_service_port"] = v["auth"]["ebrains"]["token_service_port"]
    if v["jobs"]["enabled"]:
        ports["jobs.port"] = v["jobs"]["port"]
    if len(set(ports.values())) < len(ports):
        raise ConfigError(f"{', '.join(ports)} must all be different ports")
    if v["nrp"]["port"] not in v["proxy_ports"]:
        raise ConfigError(f"proxy_ports: must include nrp.port ({v['nrp']['port']}) or the NRP route cannot work")
    repos = [r["name"] if isinstance(r, dict) else r.partition(":")[0] for r in v["git_kernel"]["repos"]]
    if twice := sorted({name for name in repos if repos.count(name) > 1}):
        raise ConfigError(
            f"git_kernel.repos: {', '.join(twice)} named more than once; each repository is a folder "
            f"of ~/sPyNNakerGit, so names must differ"
        )


def _check_spinnaker(d: Deployment) -> None:
    """The `spinnaker:` section's rules across keys (board modes; see boards.py)."""
    sp = d.values["spinnaker"]
    spalloc = sp["spalloc"]
    if sp["mode"] in ("session", "per-run"):
        url = spalloc["url"] or ""
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"spinnaker.spalloc.url: required when spinnaker.mode is '{sp['mode']}': the "
                f"allocation service's http(s) URL, e.g. https://spinnaker.cs.man.ac.uk/spalloc/"
                f"{f' (got {url!r})' if url else ''}"
            )
        if spalloc["ca_certs"] and not d.path(spalloc["ca_certs"], Path()).is_file():
            raise ConfigError(f"spinnaker.spalloc.ca_certs: no such file {spalloc['ca_certs']}")
    if sp["mode"] == "session":
        d.spalloc_token()
        if sp["claim_timeout"] < 1:
            raise ConfigError(
                "spinnaker.claim_timeout: must be at least 1 s in mode 'session' (boards take time to be switched on)"
            )
