"""Agents and operators reach the gateway over TLS (SPEC §2 "Agents' keys are bearer
secrets", §6 `tls`, `admin.tls`): the official SDKs verifying the chain, HTTP/2 by ALPN,
the admin API and dashboard over HTTPS, certificates rotated by SIGHUP, and plain HTTP on
the TLS port never served.

Hermetic: a throwaway CA and certificates made with `openssl` in a temp dir, the plain-HTTP
mock, and `spidergate serve` with `tls` and `admin.tls`.

    SPIDERGATE_BIN=target/debug/spidergate python3 -m pytest -q tests/e2e/test_tls_listener.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from gateway_fixture import (
    ANTHROPIC_PROVIDER_KEY,
    OPENAI_PROVIDER_KEY,
    _bin_path,
    _free_port,
    _mock_bin_path,
    _stop,
    _wait_tcp,
    openai_cost_nanos,
)

ADMIN_TOKEN = "tls-e2e-admin-token"
DEADLINE_S = 30.0


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> Path:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)
    return d / f"{name}.pem"


def make_leaf(d: Path, ca: str, name: str, serial: int) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 signed by `ca`, with a chosen serial."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", "/CN=localhost", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(serial), "-days", "2", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


class TlsGateway:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ca = make_ca(tmp, "test-ca")
        self.cert, self.key = make_leaf(tmp, "test-ca", "leaf1", 0x1111)
        # The files the config names; rotation overwrites them in place, as certbot's
        # deploy hook would.
        self.cert_file, self.key_file = tmp / "fullchain.pem", tmp / "privkey.pem"
        self.cert_file.write_bytes(self.cert.read_bytes())
        self.key_file.write_bytes(self.key.read_bytes())
        self.mock_port, self.port, self.admin_port = _free_port(), _free_port(), _free_port()
        self.config = tmp / "spidergate.yaml"
        self.config.write_text(f"""\
listen: "127.0.0.1:{self.port}"
database: "{tmp / 'spidergate.db'}"
tls:
  cert_file: "{self.cert_file}"
  key_file: "{self.key_file}"
admin:
  listen: "127.0.0.1:{self.admin_port}"
  token_env: TLS_E2E_ADMIN_TOKEN
  tls:
    cert_file: "{self.cert_file}"
    key_file: "{self.key_file}"
providers:
  - name: mock-openai
    kind: openai
    base_url: "http://127.0.0.1:{self.mock_port}/v1"
    api_key_env: E2E_OPENAI_PROVIDER_KEY
  - name: mock-anthropic
    kind: anthropic
    base_url: "http://127.0.0.1:{self.mock_port}"
    api_key_env: E2E_ANTHROPIC_PROVIDER_KEY
models:
  - id: gpt-4o-mini
    provider: mock-openai
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 16384
  - id: claude-haiku-4-5
    provider: mock-anthropic
    input_usd_per_mtok: 1.00
    output_usd_per_mtok: 5.00
    max_output_tokens: 64000
  - id: whisper-1
    provider: mock-openai
    upstream_id: whisper-upstream-renamed
    endpoint: transcriptions
    usd_per_minute: 0.006
server:
  reload_interval_ms: 50
""")
        self.env = dict(os.environ)
        self.env.update({
            "E2E_OPENAI_PROVIDER_KEY": OPENAI_PROVIDER_KEY,
            "E2E_ANTHROPIC_PROVIDER_KEY": ANTHROPIC_PROVIDER_KEY,
            "TLS_E2E_ADMIN_TOKEN": ADMIN_TOKEN,
        })
        self.env.pop("SPIDERGATE_CONFIG", None)
        self.bin = _bin_path()
        self.log_path = tmp / "gateway.log"
        self.mock = self.proc = None

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}/v1"

    @property
    def admin_url(self) -> str:
        return f"https://localhost:{self.admin_port}"

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(verify=self.ssl_context(), timeout=30, **kw)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def start(self) -> None:
        self.mock = subprocess.Popen(
            [str(_mock_bin_path(self.bin)), "--listen", f"127.0.0.1:{self.mock_port}", "--threads", "2"],
            cwd=self.tmp, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_tcp(self.mock_port, self.mock, DEADLINE_S, "mock provider")
        check = self.cli("check-config")
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([str(self.bin), "--config", str(self.config), "serve"],
                                     cwd=self.tmp, env=self.env, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + DEADLINE_S
        with self.client() as c:
            while True:
                assert self.proc.poll() is None, self.log_path.read_text(errors="replace")
                try:
                    if c.get(f"https://localhost:{self.port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "gateway /health over TLS"
                time.sleep(0.05)

    def stop(self) -> None:
        _stop(self.proc)
        _stop(self.mock)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin), "--config", str(self.config), *args],
                              env=self.env, capture_output=True, text=True, timeout=30)

    def create_key(self) -> str:
        out = self.cli("keys", "create", "--name", "tls-agent", "--json")
        assert out.returncode == 0, out.stderr
        secret = json.loads(out.stdout)["secret"]
        deadline = time.monotonic() + 10
        with self.client() as c:
            while time.monotonic() < deadline:
                r = c.post(f"{self.base_url}/chat/completions",
                           headers={"Authorization": f"Bearer {secret}"}, json={})
                if r.status_code not in (401, 429):
                    return secret
                time.sleep(0.03)
        raise AssertionError("key not live")

    def metric(self, name: str) -> float:
        with self.client() as c:
            text = c.get(f"{self.admin_url}/metrics",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} in /metrics")

    def served_serial(self, port: int | None = None) -> str:
        """The serial of the certificate a new connection is served (verified against the CA)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with socket.create_connection(("127.0.0.1", port or self.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                return s.getpeercert()["serialNumber"].upper()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = TlsGateway(tmp_path_factory.mktemp("tls-listener"))
    g.start()
    yield g
    g.stop()


def test_openai_sdk_over_https_verifies_the_chain_plain_and_streamed(gw):
    secret = gw.create_key()
    client = openai.OpenAI(base_url=gw.base_url, api_key=secret, max_retries=0,
                           http_client=gw.client())
    r = client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # A client that does not trust the gateway's CA refuses to talk to it.
    untrusting = openai.OpenAI(base_url=gw.base_url, api_key=secret, max_retries=0,
                               http_client=httpx.Client(timeout=10))
    with pytest.raises(openai.APIConnectionError):
        untrusting.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "hi"}])
    # Two calls charged exactly, nothing for the refused connection.
    with gw.client() as c:
        u = c.get(f"{gw.base_url}/usage", headers={"Authorization": f"Bearer {secret}"}).json()
    want = 2 * openai_cost_nanos("gpt-4o-mini", prompt_tokens=10, completion_tokens=5)
    assert u["spend_nanodollars"] == want, u


def test_anthropic_sdk_over_https(gw):
    secret = gw.create_key()
    client = anthropic.Anthropic(base_url=f"https://localhost:{gw.port}", api_key=secret,
                                 max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(verify=gw.ssl_context()))
    msg = client.messages.create(model="claude-haiku-4-5", max_tokens=50,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.usage.output_tokens == 5
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=50,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0


def _curl(gw, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--cacert", str(gw.ca), *args],
                          capture_output=True, text=True, timeout=60)


def test_curl_http2_gets_http2_by_alpn_plain_streamed_and_large(gw, tmp_path):
    secret = gw.create_key()
    auth = ["-H", f"Authorization: Bearer {secret}", "-H", "Content-Type: application/json"]
    r = _curl(gw, "--http2", "-o", str(tmp_path / "plain.json"), "-w", "%{http_version} %{http_code}",
              *auth, "-d", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
              f"{gw.base_url}/chat/completions")
    assert r.stdout == "2 200", (r.stdout, r.stderr)
    body = json.loads((tmp_path / "plain.json").read_text())
    assert body["usage"]["completion_tokens"] == 5
    r = _curl(gw, "--http2", "-N", "-o", str(tmp_path / "stream.txt"), "-w", "%{http_version} %{http_code}",
              *auth, "-d", '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}',
              f"{gw.base_url}/chat/completions")
    assert r.stdout == "2 200", (r.stdout, r.stderr)
    assert "data: [DONE]" in (tmp_path / "stream.txt").read_text()
    # 16 MiB over HTTP/2 (many DATA frames, flow control) reaches the upstream whole: the mock
    # reports the prompt as the body's length when asked.
    content = "a" * (16 << 20)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"model": "gpt-4o-mini", "max_tokens": 5,
                               "messages": [{"role": "user", "content": content}]}))
    r = _curl(gw, "--http2", "-o", str(tmp_path / "big.out"), "-w", "%{http_version} %{http_code}",
              *auth, "-H", "x-mock-prompt-tokens: bytes", "--data-binary", f"@{big}",
              f"{gw.base_url}/chat/completions")
    assert r.stdout == "2 200", (r.stdout, r.stderr, (tmp_path / "big.out").read_text()[:300])
    usage = json.loads((tmp_path / "big.out").read_text())["usage"]
    # The forwarded body differs from the client's only by the gateway's own fields, so it
    # is at least as long as the 16 MiB content.
    assert usage["prompt_tokens"] >= 16 << 20, usage
    # Anthropic's Messages API over HTTP/2, plain and streamed, with the key as x-api-key.
    msg_headers = ["-H", f"x-api-key: {secret}", "-H", "anthropic-version: 2023-06-01",
                   "-H", "Content-Type: application/json"]
    r = _curl(gw, "--http2", "-o", str(tmp_path / "msg.json"), "-w", "%{http_version} %{http_code}",
              *msg_headers, "-d", '{"model":"claude-haiku-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}',
              f"https://localhost:{gw.port}/v1/messages")
    assert r.stdout == "2 200", (r.stdout, r.stderr)
    assert json.loads((tmp_path / "msg.json").read_text())["usage"]["output_tokens"] == 5
    r = _curl(gw, "--http2", "-N", "-o", str(tmp_path / "msg.txt"), "-w", "%{http_version} %{http_code}",
              *msg_headers, "-d", '{"model":"claude-haiku-4-5","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"hi"}]}',
              f"https://localhost:{gw.port}/v1/messages")
    assert r.stdout == "2 200", (r.stdout, r.stderr)
    assert "event: message_stop" in (tmp_path / "msg.txt").read_text()
    # HTTP/1.1 still works on the same port.
    r = _curl(gw, "--http1.1", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
              f"https://localhost:{gw.port}/health")
    assert r.stdout == "1.1 200", r.stdout


def test_an_h2_client_hanging_up_mid_stream_is_still_charged(gw, tmp_path):
    secret = gw.create_key()
    # curl stops after 2 s while the mock still streams (one chunk per 500 ms).
    _curl(gw, "--http2", "-N", "--max-time", "2", "-o", str(tmp_path / "cut.txt"),
          "-H", f"Authorization: Bearer {secret}", "-H", "Content-Type: application/json",
          "-H", "x-mock-chunks: 20", "-H", "x-mock-chunk-delay-ms: 500",
          "-d", '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}',
          f"{gw.base_url}/chat/completions")
    assert "data:" in (tmp_path / "cut.txt").read_text()
    deadline = time.monotonic() + 20
    with gw.client() as c:
        while True:
            u = c.get(f"{gw.base_url}/usage", headers={"Authorization": f"Bearer {secret}"}).json()
            if u["spend_nanodollars"] > 0:
                break
            assert time.monotonic() < deadline, u
            time.sleep(0.1)
    assert u["requests_this_minute"] >= 1


def test_admin_api_and_dashboard_over_https(gw):
    with gw.client() as c:
        keys = c.get(f"{gw.admin_url}/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert keys.status_code == 200, keys.text
        assert c.get(f"{gw.admin_url}/admin/keys").status_code == 401
        page = c.get(f"{gw.admin_url}/dashboard/gate/keys")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        csp = page.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0], csp
        assert 'name="token"' in page.text or "app.js" in page.text
    expiry = gw.metric('spidergate_tls_certificate_expiry_seconds{listener="admin"}')
    assert expiry > time.time()


def test_plain_http_on_the_tls_port_is_never_served(gw):
    for port in (gw.port, gw.admin_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            s.settimeout(5)
            got = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except (socket.timeout, ConnectionResetError):
                pass
        assert not got.startswith(b"HTTP/"), got[:100]


def _sighup_and_wait(gw, failures_before: float, reloads_before: float) -> str:
    os.kill(gw.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if gw.metric("spidergate_config_reloads_total") > reloads_before:
            return "applied"
        if gw.metric("spidergate_config_reload_failures_total") > failures_before:
            return "refused"
        time.sleep(0.05)
    raise AssertionError("SIGHUP not handled")


def test_sighup_rotates_the_certificate_with_a_stream_open_across_it(gw, tmp_path):
    secret = gw.create_key()
    assert gw.served_serial() == "1111"
    assert gw.served_serial(gw.admin_port) == "1111"
    # A slow stream on a connection made with the old certificate.
    with gw.client() as c:
        with c.stream("POST", f"{gw.base_url}/chat/completions",
                      headers={"Authorization": f"Bearer {secret}", "x-mock-chunks": "8",
                               "x-mock-chunk-delay-ms": "200"},
                      json={"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert first
            # certbot renews: new files in place, then SIGHUP.
            cert2, key2 = make_leaf(gw.tmp, "test-ca", "leaf2", 0x2222)
            gw.cert_file.write_bytes(cert2.read_bytes())
            gw.key_file.write_bytes(key2.read_bytes())
            outcome = _sighup_and_wait(gw, gw.metric("spidergate_config_reload_failures_total"),
                                       gw.metric("spidergate_config_reloads_total"))
            assert outcome == "applied"
            rest = list(lines)
            assert "data: [DONE]" in rest, rest[-3:]
    assert gw.served_serial() == "2222"
    assert gw.served_serial(gw.admin_port) == "2222"
    assert "now serving certificate 2222" in gw.log_path.read_text(errors="replace")


def test_a_bad_pair_is_refused_by_check_config_and_by_sighup_and_the_old_one_kept(gw):
    before = gw.served_serial()
    good_cert, good_key = gw.cert_file.read_bytes(), gw.key_file.read_bytes()
    # A key that belongs to another certificate.
    other_cert, other_key = make_leaf(gw.tmp, "test-ca", "other", 0x3333)
    gw.key_file.write_bytes(other_key.read_bytes())
    try:
        check = gw.cli("check-config")
        assert check.returncode != 0
        assert "tls.key_file" in check.stderr and "does not match" in check.stderr, check.stderr
        failures = gw.metric("spidergate_config_reload_failures_total")
        outcome = _sighup_and_wait(gw, failures, gw.metric("spidergate_config_reloads_total"))
        assert outcome == "refused"
        assert gw.served_serial() == before
        assert "tls.key_file" in gw.log_path.read_text(errors="replace")
        # Not PEM at all.
        gw.cert_file.write_text("not a certificate\n")
        check = gw.cli("check-config")
        assert check.returncode != 0 and "tls.cert_file" in check.stderr, check.stderr
    finally:
        gw.cert_file.write_bytes(good_cert)
        gw.key_file.write_bytes(good_key)
    assert gw.cli("check-config").returncode == 0
    # Still serving, same certificate.
    secret = gw.create_key()
    with gw.client() as c:
        r = c.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert gw.served_serial() == before


def test_an_h2_client_streams_a_large_transcription_upload(gw, tmp_path):
    """SPEC §3: a form larger than `server.multipart_hold_bytes` (1 MiB) sent over HTTP/2
    (many DATA frames, flow control) goes upstream as it arrives: whole, with only its
    `model` rewritten, and charged the reported duration."""
    secret = gw.create_key()
    # 2.4 MB that are not text: bytes of every value, CRs and LFs among them.
    audio = hashlib.shake_256(b"h2 upload").digest(2_400_000)
    path = tmp_path / "speech.mp3"
    path.write_bytes(audio)
    r = _curl(gw, "--http2", "-o", str(tmp_path / "upload.json"), "-w", "%{http_version} %{http_code}",
              "-H", f"Authorization: Bearer {secret}",
              "-F", "model=whisper-1", "-F", "response_format=verbose_json",
              "-F", f"file=@{path};filename=speech.mp3;type=audio/mpeg",
              f"{gw.base_url}/audio/transcriptions")
    assert r.stdout == "2 200", (r.stdout, r.stderr, (tmp_path / "upload.json").read_text()[:300])
    # The mock names the SHA-256 and size of the file part it received.
    body = json.loads((tmp_path / "upload.json").read_text())
    assert body["text"] == f"sha256:{hashlib.sha256(audio).hexdigest()} bytes:{len(audio)}", body
    # The mock reports 150 s (2,400,000 bytes at 16,000 a second): 2.5 min at 0.006 USD.
    with gw.client() as c:
        u = c.get(f"{gw.base_url}/usage", headers={"Authorization": f"Bearer {secret}"}).json()
    assert u["spend_nanodollars"] == 15_000_000, u
    assert u["by_model"]["whisper-1"]["requests"] == 1, u
