"""A targets key that lives in a PKCS#11 token (SoftHSM2) signs a release through an
`hsm:` URI; a python-tuf ngclient verifies the result.

The token is a real SoftHSM2 token in a temporary directory (SOFTHSM2_CONF points at a
config whose tokendir is there); the ECDSA P-256 key pair is generated inside the token
and its private half never leaves it. Every step runs the installed console script in
a subprocess, so the PKCS#11 library is initialised per process with this config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import run_tool
from tests.signing_helpers import KEYS_DIR, ngclient_fetch_all, serve, tree_digest, write_image

SIGN_RELEASE = Path(sys.executable).parent / "sign-release"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "123456"
URI = "hsm:2?label=release-signing"

GENERATE = textwrap.dedent("""
    import os, pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters
    token = pkcs11.lib(os.environ["PYKCS11LIB"]).get_token(token_label="release-signing")
    with token.open(rw=True, user_pin=os.environ["SIGN_RELEASE_PIN"]) as session:
        params = session.create_domain_parameters(pkcs11.KeyType.EC, {
            pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        # id 2 is what the `hsm:2` URI names (securesystemslib's HSMSigner key id).
        params.generate_keypair(store=True, id=b"\\x02", label="targets")
""")


def test_targets_key_in_softhsm_signs_a_release(tmp_path: Path) -> None:
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp_path / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(conf),
        "PYKCS11LIB": MODULE,
        "SIGN_RELEASE_PIN": PIN,
        # root, snapshot and timestamp are the INSECURE keys of keys-example/ (a test)
        "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS": "1",
    }
    os.environ["SOFTHSM2_CONF"] = str(conf)  # for run_tool's softhsm2-util below
    try:
        run_tool(
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "release-signing",
            "--pin",
            PIN,
            "--so-pin",
            "87654321",
        )
    finally:
        del os.environ["SOFTHSM2_CONF"]
    subprocess.run([sys.executable, "-c", GENERATE], env=env, check=True)

    def sr(*args: str | Path, code: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(SIGN_RELEASE), *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == code, proc.stderr
        return proc

    hsm_pub = tmp_path / "hsm-targets.pub"
    sr("pubkey", URI, hsm_pub)
    key = json.loads(hsm_pub.read_text())
    assert key["keytype"] == "ecdsa" and key["scheme"] == "ecdsa-sha2-nistp256"

    repo = tmp_path / "repo"
    sr(
        "init",
        repo,
        "--root-key",
        KEYS_DIR / "root.pub",
        "--targets-key",
        hsm_pub,
        "--snapshot-key",
        KEYS_DIR / "snapshot.pub",
        "--timestamp-key",
        KEYS_DIR / "timestamp.pub",
        "--sign-with",
        KEYS_DIR / "root",
    )
    image = write_image(tmp_path / "img", 50_000)
    # A key file of another role and a wrong PIN are both refused, the repo untouched.
    before = tree_digest(repo)
    err = sr(
        "add",
        repo,
        image,
        "--version",
        "3.0.0",
        "--hardware",
        "x86_64-efi",
        "--sign-with",
        KEYS_DIR / "targets",
        code=2,
    ).stderr
    assert "not a key of role targets" in err
    wrong = subprocess.run(
        [
            str(SIGN_RELEASE),
            "add",
            str(repo),
            str(image),
            "--version",
            "3.0.0",
            "--hardware",
            "x86_64-efi",
            "--sign-with",
            URI,
        ],
        env={**env, "SIGN_RELEASE_PIN": "000000"},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr.startswith(f"sign-release: error: {URI}")
    assert tree_digest(repo) == before

    sr("add", repo, image, "--version", "3.0.0", "--hardware", "x86_64-efi", "--sign-with", URI)
    sr(
        "publish",
        repo,
        "--snapshot-key",
        KEYS_DIR / "snapshot",
        "--timestamp-key",
        KEYS_DIR / "timestamp",
    )
    targets = json.loads((repo / "metadata" / "1.targets.json").read_text())
    assert [s["keyid"] for s in targets["signatures"]] == [key["keyid"]]
    root_json = repo / "metadata" / "1.root.json"
    sr("verify", repo, "--root", root_json)
    with serve(repo) as url:
        files = ngclient_fetch_all(url, tmp_path / "node", root_json)
    # The image and its chunk index (docs/delta.md).
    assert list(files) == ["x86_64-efi/3.0.0/root.img.zst", "x86_64-efi/3.0.0/root.index"]
