"""Saved model directories name their encoder portably (hub name, relative path, or a bundled copy), and an
uncached hub name with no network fails at once with one line."""

import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from flowkern.models import BertFlow, SentenceEncoder

SENTENCES = [f"{who} is {doing} on the beach." for who in ("A man", "A woman", "The dog", "Two girls")
             for doing in ("playing", "running", "eating", "sitting")]
NEW = ["A fresh sentence about a horse.", "Another one about a bird in the snow."]
REPO = Path(__file__).resolve().parents[2]


def fitted(encoder_dir: Path) -> BertFlow:
    model = BertFlow(SentenceEncoder(encoder_dir), flow={"levels": 2, "depth": 2, "hidden": 16})
    model.fit(SENTENCES, batch_size=8, lr=1e-2)
    return model


def test_a_model_directory_moved_with_its_encoder_loads(tiny_bert, tmp_path):
    shutil.copytree(tiny_bert, tmp_path / "before" / "bert")
    model = fitted(tmp_path / "before" / "bert")
    model.save(tmp_path / "before" / "model")
    assert json.loads((tmp_path / "before" / "model" / "config.json").read_text())["encoder"] == "../bert"
    (tmp_path / "before").rename(tmp_path / "after")
    loaded = BertFlow.load(tmp_path / "after" / "model")
    assert Path(loaded.encoder.name) == (tmp_path / "after" / "bert").resolve()
    np.testing.assert_array_equal(loaded.encode(NEW), model.encode(NEW))
    # Moved alone, the model directory names the encoder path it is missing.
    (tmp_path / "after" / "model").rename(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"config.json: the encoder directory \.\./bert \(.*\) is missing; "
                                                r"move it together with the model directory, or save with "
                                                r"bundle=True \(flowkern fit --bundle\)$"):
        BertFlow.load(tmp_path / "model")
    # Directories written before relative paths, with the encoder's absolute path, still load.
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["encoder"] = str((tmp_path / "after" / "bert").resolve())
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(BertFlow.load(tmp_path / "model").encode(NEW), model.encode(NEW))


def test_a_bundled_model_directory_is_self_contained(tiny_bert, tmp_path):
    shutil.copytree(tiny_bert, tmp_path / "bert")
    model = fitted(tmp_path / "bert")
    model.save(tmp_path / "model", bundle=True)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["encoder"] == "./encoder"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "model" / "encoder").iterdir()}
    shutil.rmtree(tmp_path / "bert")
    (tmp_path / "model").rename(tmp_path / "moved")
    loaded = BertFlow.load(tmp_path / "moved")
    np.testing.assert_array_equal(loaded.encode(NEW), model.encode(NEW))


def test_an_uncached_hub_name_fails_at_once_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # At once: no connection attempted at all (counted, not timed, so a loaded machine cannot fail it).
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(OSError, match=r"^encoder 'flowkern-tests/no-such-model' is not in the local HuggingFace "
                                      r"cache and the hub cannot be reached \(offline\); pass a local model "
                                      r"directory instead \(--encoder DIR"):
        SentenceEncoder("flowkern-tests/no-such-model")
    assert attempts == []


class _SilentHub(socketserver.ThreadingTCPServer):
    """A hub on a loopback port that records the request line of each connection and closes it without an
    answer."""

    daemon_threads = True

    def __init__(self):
        self.requests = []
        server = self

        class CloseWithoutAnswer(socketserver.StreamRequestHandler):
            timeout = 10

            def handle(self):
                server.requests.append(self.rfile.readline(1000).decode("latin-1").strip())

        super().__init__(("127.0.0.1", 0), CloseWithoutAnswer)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_an_unreachable_hub_fails_at_once(tmp_path):
    # A hub that answers nothing (no offline mode set): one probe, not transformers' ~50 s of retries. Counted, not
    # timed, so a loaded machine cannot fail it. (huggingface_hub may make calls of its own, naming no model.)
    script = ("from flowkern.models import SentenceEncoder\n"
              "try:\n    SentenceEncoder('flowkern-tests/no-such-model')\nexcept OSError as error:\n    print(error)\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and not key.lower().endswith("_proxy")}
    with _SilentHub() as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
        try:
            result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                    timeout=120)
        finally:
            hub.shutdown()
    assert result.stdout.startswith("encoder 'flowkern-tests/no-such-model' is not in the local"), result.stderr[-2000:]
    assert [line for line in hub.requests if line.startswith("HEAD / ")] == ["HEAD / HTTP/1.1"], hub.requests
    assert not [line for line in hub.requests if "no-such-model" in line], hub.requests
