"""The server key that encrypts stored EC2 secrets (a Fernet key)."""

from __future__ import annotations

import os

from cryptography.fernet import Fernet

from app.settings import Settings


def load_cipher(settings: Settings) -> Fernet:
    """``NEPHOS_SECRET_KEY`` if set; else the key file, made (mode 0600) on first start."""
    if settings.secret_key is not None:
        return Fernet(settings.secret_key.get_secret_value().encode())
    path = settings.secret_key_file
    if not path.exists():
        # Processes starting together (api, dispatcher) may both get here: the key is written to
        # a private file and linked into place, which only one can do; the others read the
        # winner's key, whole.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return Fernet(path.read_bytes().strip())
