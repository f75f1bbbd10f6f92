"""Write MLflow's basic-auth configuration file from environment variables, with mode 0600.

``mlflow server --app-name basic-auth`` reads an INI file (section ``[mlflow]``) named by
``$MLFLOW_AUTH_CONFIG_PATH``. Its ``database_uri`` (the auth user store, here in the same
PostgreSQL database as the tracking store) holds a password and has no environment override,
so the file is written when the pod starts, from Secret-provided variables, into an in-memory
emptyDir: the init container of manifests/base/mlflow.yaml runs

    python /opt/gpunet/mlflow_auth_config.py --output /etc/mlflow-auth/basic_auth.ini \\
        --database-uri 'postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@host:5432/{POSTGRES_DB}'

Read from the environment (never from the command line, which other processes can see):

* ``MLFLOW_AUTH_ADMIN_USERNAME`` / ``MLFLOW_AUTH_ADMIN_PASSWORD``: the admin account MLflow
  creates on its first start against an empty user store (password: 12 characters or more).
  Once that user exists MLflow ignores both; change the password through MLflow's
  update-password API.
* every ``{NAME}`` placeholder of ``--database-uri``, substituted URL-quoted, so a password may
  contain ``@``, ``:``, ``/`` or ``%``.

Standard library only: the image ships this file next to MLflow and runs it without importing
torch. Exit status 2 with a one-line message on stderr when something is missing or invalid.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
AUTHORIZATION_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"
MIN_PASSWORD_LENGTH = 12  # MLflow refuses shorter admin passwords at startup
LEGACY_DEFAULT_PASSWORD = "password1234"  # shipped by old MLflow releases; MLflow refuses it
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class AuthConfigError(ValueError):
    """A missing or unusable setting; the message names it (never its value)."""


def database_uri(template: str, env: Mapping[str, str]) -> str:
    """``template`` with each ``{NAME}`` replaced by ``$NAME``, URL-quoted."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if not env.get(name):
            raise AuthConfigError(f"--database-uri needs ${name}, which is not set or empty")
        return quote(env[name], safe="")

    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise AuthConfigError("--database-uri: placeholders are {NAME} with NAME a variable name")
    uri = _PLACEHOLDER.sub(value, template)
    if "://" not in uri:
        raise AuthConfigError("--database-uri is not a database URI (scheme://...)")
    return uri


def _ini_value(name: str, value: str) -> str:
    """``value`` as configparser (with its default %-interpolation) will read it back."""
    if "\n" in value or "\r" in value:
        raise AuthConfigError(f"{name} contains a line break")
    if value != value.strip():
        raise AuthConfigError(f"{name} has leading or trailing whitespace, which the INI "
                              "format drops")
    return value.replace("%", "%%")


def render(admin_username: str, admin_password: str, db_uri: str,
           default_permission: str = "READ") -> str:
    """The text of the ``[mlflow]`` INI file MLflow's auth app reads."""
    if not admin_username:
        raise AuthConfigError(f"${USERNAME_ENV} is not set or empty")
    if ":" in admin_username or any(c.isspace() for c in admin_username):
        raise AuthConfigError(f"${USERNAME_ENV} must not contain ':' or whitespace")
    if not admin_password:
        raise AuthConfigError(f"${PASSWORD_ENV} is not set or empty")
    if len(admin_password) < MIN_PASSWORD_LENGTH:
        raise AuthConfigError(f"${PASSWORD_ENV} is shorter than {MIN_PASSWORD_LENGTH} "
                              "characters, which MLflow refuses")
    if admin_password == LEGACY_DEFAULT_PASSWORD:
        raise AuthConfigError(f"${PASSWORD_ENV} is MLflow's old published default password")
    if default_permission not in PERMISSIONS:
        raise AuthConfigError(f"default permission must be one of {', '.join(PERMISSIONS)}")
    settings = {
        "default_permission": default_permission,
        "database_uri": _ini_value("--database-uri", db_uri),
        "admin_username": _ini_value(f"${USERNAME_ENV}", admin_username),
        "admin_password": _ini_value(f"${PASSWORD_ENV}", admin_password),
        "authorization_function": AUTHORIZATION_FUNCTION,
    }
    return "[mlflow]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically; the file is mode 0600 from its creation on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True,
                        help="where to write the INI file (point $MLFLOW_AUTH_CONFIG_PATH here)")
    parser.add_argument("--database-uri", required=True,
                        help="auth store URI; {NAME} placeholders are filled from $NAME")
    parser.add_argument("--default-permission", default="READ", choices=PERMISSIONS,
                        help="what users have on resources they were given no permission on")
    args = parser.parse_args(argv)
    try:
        text = render(env.get(USERNAME_ENV, ""), env.get(PASSWORD_ENV, ""),
                      database_uri(args.database_uri, env), args.default_permission)
        write_private(args.output, text)
    except (AuthConfigError, OSError) as exc:
        print(f"mlflow_auth_config: error: {exc}", file=sys.stderr)
        return 2
    print(f"mlflow_auth_config: wrote {args.output} (mode 0600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
