"""Plant small, realistic mistakes one at a time and report which the tests catch (run by hand, not by CI).

    python3 tests/mutation_check.py              # every mistake below
    python3 tests/mutation_check.py rope_sign    # some of them, by name
    python3 tests/mutation_check.py --list
    python3 tests/mutation_check.py --snippets   # are the entries up to date with the code?

The working tree is never changed. The project's files (what git tracks, plus untracked files it does not
ignore) are copied into a temporary folder, next to a link to ../shared as in CI; each mistake is planted in
that copy, its tests run there with pytest, and the file is put back before the next one. Each mistake is
reported as
    caught             its tests fail with it (and passed without it: the baseline run checks that first)
    NOT caught         its tests pass with it: a gap, add a test
    snippet not found  the code changed and the entry must be updated (never silently counted as caught)
    snippet found N x  the snippet is ambiguous: make it longer
    error              pytest could not run the tests (e.g. a test id that no longer exists)
`--snippets` checks only that every snippet occurs once and every test function exists (seconds, no
pytest): run it after moving code. pytest collects test_*.py only, so this file is not part of
`python3 -m pytest tests`.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEST_TIMEOUT_S = 600          # one mistake's tests; a hang counts as caught only if they fail, so it is an error
PYTEST_FAILED = 1             # pytest's exit status when tests ran and some failed


@dataclass
class Mistake:
    name: str
    file: str                 # relative to the project root
    original: str             # must occur exactly once in the file
    mistake: str
    tests: tuple              # pytest node ids, relative to the project root
    what: str


MO, FILES, TRAIN, DATA, CHAT = "minimind_o.py", "files.py", "train.py", "data.py", "chat.py"
SIDE = "tests/test_side_modules.py::"
MODEL, GEN, SAMPLE = "tests/test_model.py::", "tests/test_generate.py::", "tests/test_sample.py::"
NUMERICS = "tests/test_numerics.py::"
NOTEBOOK = "tests/test_tutorial.py::test_notebook_executes[{}.ipynb]".format

MISTAKES = [
    # (A sign slip in the CMVN cannot be planted: funasr's own front end applies it. The encoder-input test
    # below guards it, and the dither's scale is the one constant of the front end in our code.)
    Mistake("dither_scale", MO, "DITHER = 1.0 / 32768", "DITHER = 1.0",
            (SIDE + "test_encoder_input_is_funasr_front_end_with_the_folder_cmvn",
             SIDE + "test_speech_features_are_funasrs_dithered_front_end_and_repeat"),
            "the fbank dither on the int16 scale applied to a [-1, 1] waveform"),
    Mistake("moe_least_likely", MO, "weight, expert = probs.topk(self.top_k, dim=-1)",
            "weight, expert = probs.topk(self.top_k, dim=-1, largest=False)",
            (MODEL + "test_moe_sends_each_token_to_its_most_likely_expert",), "MoE routes to the least likely expert"),
    Mistake("moe_aux_without_E", MO, "aux = (share * probs.mean(0)).sum() * len(self.experts) * self.aux_loss_coef",
            "aux = (share * probs.mean(0)).sum() * self.aux_loss_coef",
            (MODEL + "test_moe_aux_loss_by_hand",), "MoE aux loss without its x E"),
    Mistake("rope_sign", MO, "rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)",
            "rotated = torch.cat([x[..., half:], -x[..., :half]], dim=-1)",
            (MODEL + "test_rope_turns_each_channel_pair_by_position_times_its_frequency",), "rotate-half sign flipped"),
    Mistake("audio_layers_early", MO, "torch.where(layer < n, ids, AUDIO_PAD)", "torch.where(layer <= n, ids, AUDIO_PAD)",
            (GEN + "test_scripted_generation_follows_the_delay_schedule",), "generation: audio layers start a step early"),
    Mistake("penalty_divides_negative", MO, "return torch.where(logits > 0, logits / penalty, logits * penalty)",
            "return logits / penalty",
            (GEN + "test_the_penalty_divides_positive_logits_and_multiplies_negative_ones",),
            "repetition penalty divides negative logits too"),
    Mistake("scheduled_sampling_audio_gt", DATA, "(rand(*ids.shape[:-2], ids.shape[-1]) < p)",
            "(rand(*ids.shape[:-2], ids.shape[-1]) > p)",
            (SAMPLE + "test_scheduled_sampling_replaces_a_share_p_of_labelled_inputs",),
            "scheduled sampling corrupts 1 - p of the audio inputs"),
    Mistake("scheduled_sampling_text_gt", DATA, "(rand(*text.shape) < p)", "(rand(*text.shape) > p)",
            (SAMPLE + "test_scheduled_sampling_replaces_a_share_p_of_labelled_inputs",),
            "scheduled sampling corrupts 1 - p of the text inputs"),
    Mistake("save_not_atomic", FILES,
            '    with atomic_path(path) as tmp:\n        torch.save(mo.official_state_dict(model), tmp)\n',
            "    torch.save(mo.official_state_dict(model), path)\n",
            (MODEL + "test_a_save_killed_while_writing_leaves_the_old_checkpoint_whole",),
            "save_checkpoint writes straight to the path"),
    Mistake("rmsnorm_sum", MO, "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)",
            "torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + self.eps)",
            (NOTEBOOK("01_blocks"),), "RMSNorm divides by the root of the sum, not the mean"),
    Mistake("bridge_layer", MO, "self.bridge_layer = self.num_hidden_layers // 2 - 1",
            "self.bridge_layer = self.num_hidden_layers // 2",
            (NOTEBOOK("03_thinker_bridge"),), "the Talker reads block 5 of 8, not block 4"),
    Mistake("stop_weight", MO, "def omni_loss(out, text_labels, audio_labels, stop_weight=STOP_WEIGHT):",
            "def omni_loss(out, text_labels, audio_labels, stop_weight=1.0):",
            (MODEL + "test_omni_loss_weights_stop_and_averages_layers",), "the stop id weighs 1, not 10"),
    Mistake("stop_weight_unused", MO, "head_loss(audio_head, audio_h[audio_at], codes, stop_weight)",
            "head_loss(audio_head, audio_h[audio_at], codes)",
            (MODEL + "test_omni_loss_weights_stop_and_averages_layers",), "the audio loss weighs the stop id 1, not 10"),
    Mistake("codec_head_positions", MO, "(audio_labels != IGNORE).any(1)", "(audio_labels[:, 0] != IGNORE)",
            (MODEL + "test_omni_loss_weights_stop_and_averages_layers",),
            "the codec head runs only where layer 0 has a label, so the delayed layers' last codes are not learned"),
    Mistake("upper_blocks_stop_too_early", MO, "math.ceil((last + 1) / self.width_multiple)",
            "math.ceil(last / self.width_multiple)",
            ("tests/test_train.py::test_training_losses_equal_omni_loss_of_the_forward",),
            "the Thinker's upper blocks stop before the last text label, which the text head then never reads"),
    Mistake("moe_upper_blocks_cut", MO, "if text_labels is not None and not self.config.use_moe:",
            "if text_labels is not None:",
            ("tests/test_train.py::test_training_losses_equal_omni_loss_of_the_forward",),
            "a MoE's upper blocks stop after the last text label too, so its load-balance loss changes"),
    Mistake("cpu_bfloat16_ignored", TRAIN, "autocast = torch.autocast(procs.device.type, dtype=dtype) if dtype != "
            "torch.float32 else", "autocast = torch.autocast(procs.device.type, dtype=dtype) if procs.device.type != "
            "'cpu' and dtype != torch.float32 else",
            ("tests/test_train.py::test_bfloat16_on_the_cpu_autocasts_the_step",),
            "--dtype bfloat16 on the CPU silently trains in float32"),
    Mistake("answer_delay", MO, "first = s + 1 + i\n", "first = s + i\n",
            (SAMPLE + "test_answer_layers_are_delayed_and_end_with_stop",), "answer layer i starts at s + i"),
    Mistake("untied_head", MO, "self.lm_head.weight = self.thinker.embed_tokens.weight  # tied",
            "pass  # untied",
            (MODEL + "test_parameter_counts_match_the_paper",), "the text head is not tied to the embedding"),
    Mistake("no_newline_after_eos", MO, "itertools.chain([NEWLINE], itertools.repeat(TEXT_PAD))",
            "itertools.chain([TEXT_PAD], itertools.repeat(TEXT_PAD))",
            (GEN + "test_scripted_generation_follows_the_delay_schedule",), "after EOS the text row reads 0, not 234"),
    Mistake("frame_index", MO, "emitted_at = n - N_CODEBOOKS + 1 + layer",
            "emitted_at = n - N_CODEBOOKS + layer",
            (GEN + "test_scripted_generation_follows_the_delay_schedule",), "frames assembled one step off"),
    Mistake("inject_past_the_run", MO, "n = torch.minimum(lengths[:, None], run_end - first)",
            "n = lengths[:, None] + 0 * (run_end - first)",
            (MODEL + "test_injection_targets_first_placeholder_run_only",), "speech features overrun the placeholders"),
    Mistake("cache_mask", MO, "visible = self.kv_cache.slots <= pos[:, None]", "visible = self.kv_cache.slots < pos[:, None]",
            (MODEL + "test_decode_steps_through_the_cache_match_the_full_forward[False]",),
            "a cached step cannot see its own position"),
    Mistake("codec_embedding_sum", MO, "return (shared + per_layer) / N_CODEBOOKS", "return shared + per_layer",
            (NOTEBOOK("04_talker_codec"),), "a frame's 8 code vectors summed, not averaged"),
    Mistake("ddp_loss_not_averaged", TRAIN, "loss, text, audio, aux = (sums[:4] / self.procs.world).tolist()",
            "loss, text, audio, aux = sums[:4].tolist()",
            ("tests/test_train.py::test_two_processes_train_like_one_on_the_same_global_batch",),
            "DDP logs the sum of the processes' losses"),
    Mistake("int8_does_nothing", CHAT, "return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)",
            "return model", ("tests/test_chat.py::test_int8_and_bfloat16_replies_stay_close_to_float32",),
            "chat.py --int8 leaves the model in float32"),
    Mistake("rmsnorm_eps_outside_root", MO, "torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)",
            "(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True)) + self.eps)",
            (NUMERICS + "test_rmsnorm_adds_epsilon_to_the_mean_square_inside_the_root",),
            "RMSNorm's epsilon added after the root"),
    Mistake("nucleus_without_shift", MO, "beyond[1:] = beyond[:-1].clone()", "beyond[1:] = beyond[1:].clone()",
            (NUMERICS + "test_the_nucleus_keeps_the_smallest_set_that_reaches_top_p",),
            "nucleus: the token that crosses top_p is cut too"),
    Mistake("temperature_after_nucleus", MO, "logits = logits / (temperature + 1e-9)\n    if top_p < 1.0:",
            "if top_p < 1.0:",
            (NUMERICS + "test_the_temperature_sharpens_before_the_nucleus_cut",),
            "sampling: no temperature (it is applied nowhere before the nucleus cut)"),
    Mistake("audio_penalty_window_short", MO, "recent = codes[:, max(0, n - AUDIO_PENALTY_WINDOW):n]",
            "recent = codes[:, max(0, n - AUDIO_PENALTY_WINDOW + 1):n]",
            (NUMERICS + "test_the_audio_penalty_counts_the_last_three_codes_of_each_layer_and_no_older_one",),
            "the audio penalty's window one code short"),
    Mistake("speaker_features_mean_over_bands", MO, "return logmel - logmel.mean(dim=0, keepdim=True)",
            "return logmel - logmel.mean(dim=1, keepdim=True)",
            (NUMERICS + "test_speaker_features_are_zero_mean_over_time_in_every_mel_band",),
            "CAM++ features normalised over the mel bands instead of over time"),
    Mistake("speaker_embedding_normalised", MO, "return model(feats)[0].float().cpu()",
            "return torch.nn.functional.normalize(model(feats)[0].float(), dim=-1).cpu()",
            (NUMERICS + "test_the_speaker_embedding_is_cam_plus_plus_output_as_it_is_not_length_normalised",),
            "the speaker embedding length-normalised (voices.pt's are not)"),
    Mistake("checkpoint_dtype_ignored", FILES, "return model.to(device, dtype).eval()", "return model.to(device).eval()",
            (NUMERICS + "test_a_checkpoint_loads_in_the_dtype_asked_for_with_its_float16_values",),
            "a checkpoint loaded in float32 whatever dtype is asked for"),
]


def project_files():
    """What a clone plus the author's new files would hold: tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [f for f in listed if f and (ROOT / f).is_file()]


def copy_project(dest):
    for name in project_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)


def run_tests(project, tests):
    """pytest's exit status for these tests in the copy, or None when it ran out of time."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=project, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    return done.returncode, done.stdout[-600:]


def check(mistake, project):
    path = project / mistake.file
    original = path.read_text()
    count = original.count(mistake.original)
    if count != 1:
        return "snippet not found" if count == 0 else f"snippet found {count} x"
    path.write_text(original.replace(mistake.original, mistake.mistake))
    try:
        status, _ = run_tests(project, mistake.tests)
    finally:
        path.write_text(original)
    if status == PYTEST_FAILED:
        return "caught"
    return "NOT caught" if status == 0 else f"error (pytest exit {status})"


def stale(mistake):
    """What is out of date in an entry (its snippet not found once, a test function gone), or None."""
    count = (ROOT / mistake.file).read_text().count(mistake.original)
    if count != 1:
        return "snippet not found" if count == 0 else f"snippet found {count} x"
    for test in mistake.tests:
        path, _, name = test.partition("::")
        if f"def {name.split('[')[0]}(" not in (ROOT / path).read_text():
            return f"no test {test}"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mistakes to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mistakes and their tests")
    parser.add_argument("--snippets", action="store_true", help="only check that the entries match the code")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {m.name for m in MISTAKES}
    if unknown:
        parser.error(f"no mistake named {', '.join(sorted(unknown))}; --list shows them")
    chosen = [m for m in MISTAKES if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.file:14s} {m.what}\n{'':28s} {' '.join(m.tests)}")
        return 0
    if args.snippets:
        problems = [(m.name, stale(m)) for m in chosen if stale(m)]
        for name, problem in problems:
            print(f"{name:28s} {problem}")
        print(f"{len(chosen) - len(problems)} of {len(chosen)} entries match the code")
        return 1 if problems else 0
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        project = Path(tmp) / ROOT.name
        copy_project(project)
        if SHARED.exists():
            os.symlink(SHARED, Path(tmp) / "shared")   # the tests look for ../shared (tokenizer, voices)
        tests = sorted({t for m in chosen for t in m.tests})
        status, tail = run_tests(project, tests)
        if status != 0:
            print(f"the tests fail without any mistake planted (pytest exit {status}): fix that first\n{tail}")
            return 1
        print(f"{'mistake':28s} {'result':18s} {'s':>5s}  test")
        results = []
        for m in chosen:
            start = time.perf_counter()
            outcome = check(m, project)
            results.append(outcome)
            print(f"{m.name:28s} {outcome:18s} {time.perf_counter() - start:5.0f}  {', '.join(t.split('::')[-1] for t in m.tests)}",
                  flush=True)
    caught = results.count("caught")
    print(f"{caught} of {len(chosen)} caught")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
