"""The account-manager service token (account_removal.py) is written whole or not at all."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from spinnaker_jupyter import account_removal, config
from spinnaker_jupyter.config import ConfigError


def test_a_full_disk_leaves_no_empty_service_token(tmp_path):
    """Disk full while the token is written: one line naming the file, no empty token left to refuse the next start
    ("holds no usable token"), and the next start writes a whole one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", mnt], check=True)
    try:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data_dir": str(mnt / "data")}))
        d = config.load([tmp_path / "c.yaml"])
        d.private_hub_dir()
        with open(mnt / "filler", "wb", buffering=0) as f:  # fill the disk
            with pytest.raises(OSError):
                while True:
                    f.write(b"x" * 1024)
        with pytest.raises(ConfigError, match=r"cannot write the secret .*account-manager-token: No space left"):
            account_removal.hub_service(d)
        assert not account_removal.token_path(d).exists()
        assert [p.name for p in d.hub_dir.iterdir()] == []
        (mnt / "filler").unlink()
        service, role = account_removal.hub_service(d)
        path = account_removal.token_path(d)
        assert service["api_token"] == path.read_text() and len(service["api_token"]) == 64
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert account_removal.hub_service(d)[0]["api_token"] == service["api_token"]  # kept across starts
    finally:
        subprocess.run(["umount", mnt], check=True)
