import argparse
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

import minimind_o as mo  # noqa: E402
import files  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts):
    """A file under ../shared (the released voices), or a skip that says why (CI always has ../shared)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: the released tokenizer/voices live in ../shared beside the project")
    return path


def tiny_config(**kw):
    base = dict(hidden_size=64, num_hidden_layers=4, talker_hidden_size=64, num_talker_hidden_layers=2)
    base.update(kw)
    return mo.OmniConfig(**base)


def tokenizer_folder():
    """The released tokenizer's folder: $MINIMIND_TOKENIZER, else models/minimind-3o (where the README's
    `hf download` puts it), else ../shared/tokenizer (CI), else fetched into models/minimind-3o when the hub
    can be reached; a skip that says how to get it when none has it."""
    places = [os.environ.get("MINIMIND_TOKENIZER"), os.path.join(ROOT, "models", "minimind-3o"),
              os.path.join(SHARED, "tokenizer")]
    found = next((p for p in places if p and os.path.exists(os.path.join(p, "tokenizer.json"))), None)
    if found is None:  # a fresh clone with internet: fetch it, as train.py does
        files.download(argparse.Namespace(tokenizer=places[1]), ["tokenizer"])
        found = places[1] if os.path.exists(os.path.join(places[1], "tokenizer.json")) else None
    if found is None:
        pytest.skip("needs the released tokenizer: hf download jingyaogong/minimind-3o --include 'tokenizer*' "
                    "--local-dir models/minimind-3o (or set MINIMIND_TOKENIZER; CI has ../shared/tokenizer)")
    return found


@pytest.fixture(scope="session")
def tokenizer():
    return mo.load_tokenizer(tokenizer_folder())


@pytest.fixture(scope="session")
def tokenizer_flag():
    """train.py's and chat.py's --tokenizer for runs in the tests."""
    return ["--tokenizer", tokenizer_folder()]


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Mimi, CAM++, SenseVoice and SigLIP with random weights, in their published layouts (tests/side_assets.py)."""
    import side_assets
    root = tmp_path_factory.mktemp("side_modules")
    return {"mimi": side_assets.build_mimi(root).parent, "campplus": side_assets.build_campplus(root),
            "sensevoice": side_assets.build_sensevoice(root), "siglip": side_assets.build_siglip(root)}


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory, tokenizer_flag):
    """train.py's demo run (two steps, tiny model), with its codec head made never to stop early
    (the specials' logits zeroed: random weights would stop at random), so every reply has speech."""
    import train
    out = tmp_path_factory.mktemp("demo")
    summary = train.main(["--out_dir", str(out), "--max_steps", "2", "--save_every", "0", "--max_seq_len", "64",
                          "--batch_size", "4", "--hidden_size", "64", "--num_hidden_layers", "2", *tokenizer_flag])
    model = files.load_model(summary["checkpoint"])
    with torch.no_grad():
        for linear in [model.talker.lm_head.base] + [a[2] for a in model.talker.lm_head.adapters]:
            linear.weight[mo.CODEBOOK_SIZE:] = 0
    path = out / "demo_speaks_to_the_end.pth"
    files.save_checkpoint(model, str(path))
    return path
