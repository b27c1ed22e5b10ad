"""Job secrets at rest: sealed with Fernet (AES-128-CBC + HMAC-SHA256).

A job's secret values (``secrets:`` in a job file, SkyPilot's ``secrets``)
are needed in clear text in one place only: the environment of the job's
setup and command on its instance, where the agent receives them over its
authenticated channel after boot. Everywhere else they are names: the API
shows ``secret_names``, events and logs never carry values, and the
database holds one sealed blob per job (``jobs.secrets_sealed``), so a plain
dump of it reveals nothing without the key.

The key comes from ``GPUSCOUT_SECRETS_KEY`` (a Fernet key: 32 url-safe
base64 bytes) or is generated once into ``$GPUSCOUT_HOME/secrets_key``
(mode 0600), beside the API token. Fernet is the ``cryptography`` project's
recipe for symmetric authenticated encryption
(https://cryptography.io/en/latest/fernet/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "secrets_key"


class SecretBoxError(ValueError):
    """A sealed blob that this key cannot open (wrong key, or tampered)."""


class SecretBox:
    def __init__(self, key: bytes | str) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_home(cls, home: Path, key: str | None = None) -> SecretBox:
        """The box of this control plane: ``key`` if given, else the key file
        in ``home`` (made on first use, readable by its owner only)."""
        if key:
            return cls(key)
        path = Path(home) / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

    def seal(self, values: dict[str, str]) -> str | None:
        """The sealed text of ``values`` (None for no secrets)."""
        if not values:
            return None
        return self._fernet.encrypt(json.dumps(values, sort_keys=True).encode()).decode()

    def open(self, sealed: str | None) -> dict[str, str]:
        """The values sealed in ``sealed``; SecretBoxError if this key cannot."""
        if not sealed:
            return {}
        try:
            data = json.loads(self._fernet.decrypt(sealed.encode()))
        except InvalidToken:
            raise SecretBoxError("the job's secrets cannot be opened with this "
                                 "control plane's key (GPUSCOUT_SECRETS_KEY changed?)") from None
        return {str(k): str(v) for k, v in data.items()}
