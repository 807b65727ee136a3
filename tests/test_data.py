"""Synthetic radiographs, pair files, collation masks.  python -m pytest -q tests/test_data.py"""
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

import data
from world import synthetic
from world.eval import answer_prior, vqa_metrics


@pytest.fixture(scope="module")
def world():
    return synthetic.make_synthetic(300, seed=0, size=32)


@pytest.fixture(scope="module")
def processor(world):
    images, qa = world
    corpus = [f"{q['question']}\nAnswer: {q['answer']}" for q in qa] + [im["report"] for im in images]
    return synthetic.build_tiny(corpus, 32)[1]


def test_synthetic_is_deterministic_and_complete(world):
    images, qa = world
    again, qa2 = synthetic.make_synthetic(300, seed=0, size=32)
    assert all(np.array_equal(a["pixels"], b["pixels"]) for a, b in zip(images, again)) and qa == qa2
    other, _ = synthetic.make_synthetic(3, seed=1, size=32)
    assert not np.array_equal(other[0]["pixels"], images[0]["pixels"])
    assert {f["kind"] for im in images for f in im["findings"]} == set(synthetic.KINDS)
    assert {len(im["findings"]) for im in images} == {0, 1, 2}
    for im in images:
        assert im["pixels"].shape == (32, 32) and 0 <= im["pixels"].min() and im["pixels"].max() <= 1
        assert (im["mask"].sum() > 0) == bool(im["findings"])
    assert {q["type"] for q in qa} == {"open", "closed", "report"}


def test_test_answers_are_balanced_so_the_text_alone_tells_little(world):
    _, qa = world                                            # the SFT split: its prior is fit here
    _, test_qa = synthetic.make_synthetic(300, seed=0, size=32, split="test")
    closed = [q for q in test_qa if q["type"] == "closed" and q["qtype"] != "heart"]
    yes = sum(q["answer"] == "yes" for q in closed) / len(closed)
    assert 0.4 < yes < 0.6
    prior = vqa_metrics(test_qa, [answer_prior(qa)(q) for q in test_qa])
    assert prior["closed"] < 0.7 and prior["per_qtype"]["side"] < 0.6


def test_lesion_brightens_its_mask():
    clean, _ = synthetic.render_radiograph([], 64, np.random.default_rng(0))
    sick, masks = synthetic.render_radiograph([{"kind": "mass", "side": "right", "level": "upper"}], 64,
                                         np.random.default_rng(0))
    m = masks[0].astype(bool)
    assert m.sum() > 20 and m[:, :32].sum() == m.sum()  # patient's right = image left
    assert (sick[m] - clean[m]).mean() > 0.3


def test_collation_masks_prompt_image_and_padding(world, processor):
    images, qa = world
    pil = data.to_pil(images[0]["pixels"])
    rows = [(pil, "Is there a nodule?", "yes"), (pil, "Where is the mass?", "right upper")]
    b = data.encode_rows(processor, rows)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert b["pixel_values"].shape == (2, 3, 32, 32)
    for i, answer in enumerate(["yes", "right upper"]):
        ids, labels, att = b["input_ids"][i], b["labels"][i], b["attention_mask"][i]
        assert (ids == image_id).sum() == 16                                   # (32 / 8)^2 patches
        assert (labels[ids == image_id] == data.IGNORE_INDEX).all()
        assert (labels[att == 0] == data.IGNORE_INDEX).all()                   # padding
        labelled = labels != data.IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        assert tok.decode(ids[labelled]).replace("</s>", "").strip() == answer  # exactly the response + EOS
        assert ids[labelled][-1] == tok.eos_token_id
        first = labelled.nonzero()[0].item()
        assert tok.decode(ids[:first]).rstrip().endswith("Answer:")             # everything before is prompt
    assert b["attention_mask"][0].sum() < b["attention_mask"][1].sum()        # right padding on the short row


def test_chat_template_prompts(world, processor):
    pil = data.to_pil(world[0][0]["pixels"])
    with pytest.raises(ValueError, match="no chat template"):
        data.encode_rows(processor, [(pil, "Is there a mass?", "yes")], prompt_format="chat")
    processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                               "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{{ '\\n' }}Answer:")
    try:
        chat = data.encode_rows(processor, [(pil, "Is there a mass?", "yes")], prompt_format="chat")
        plain = data.encode_rows(processor, [(pil, "Is there a mass?", "yes")], prompt_format="plain")
    finally:
        processor.chat_template = None
    assert torch.equal(chat["input_ids"], plain["input_ids"]) and torch.equal(chat["labels"], plain["labels"])


def test_records_collate_response_major_with_their_own_images(world, processor, tmp_path):
    images, _ = world
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        data.to_pil(images[i]["pixels"]).save(paths[-1])
    pairs = [{"image": paths[0], "rejected_image": paths[1], "prompt": "Is there a mass?", "chosen": "no", "rejected": "no"},
             {"image": paths[1], "rejected_image": None, "prompt": "Is there a mass?", "chosen": "yes", "rejected": "no"}]
    load = lambda p: data.to_pil(data.read_image(p))
    dataset = data.RecordDataset(pairs, processor, load)
    b = data.collate_records([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    px = b["pixel_values"]
    # rows: chosen 0 (image 0), chosen 1 (image 1), rejected 0 (its noised image: here image 1), rejected 1 (image 1)
    assert torch.equal(px[1], px[2]) and torch.equal(px[1], px[3])
    assert not torch.equal(px[0], px[2])  # the visual pair's rejected row sees its own image
    # the same tensors as encoding the four rows in one go
    rows = [(load(path), p["prompt"], text) for j in range(2) for p in pairs for path, text in [data.record_rows(p)[j]]]
    assert [r[2] for r in rows] == ["no", "yes", "no", "no"]
    direct = data.encode_rows(processor, rows)
    assert all(torch.equal(b[k], direct[k]) for k in direct)
    # a triplet has three rows: chosen, rejected, rejected2, all on the clean image
    triplet = {**pairs[1], "rejected2": "mass"}
    assert data.record_rows(triplet) == [(paths[1], "yes"), (paths[1], "no"), (paths[1], "mass")]


def test_truncation_keeps_image_tokens_and_the_response(world, processor):
    pil = data.to_pil(world[0][0]["pixels"])
    long_q = "Is there a nodule or a mass or a pleural effusion in the left lung or the right lung?"
    full = data.encode_rows(processor, [(pil, long_q, "yes")])
    cut = data.encode_rows(processor, [(pil, long_q, "yes")], max_length=full["input_ids"].shape[1] - 5)
    assert full["truncated"].tolist() == [0] and cut["truncated"].tolist() == [1]
    assert cut["input_ids"].shape[1] == full["input_ids"].shape[1] - 5
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (cut["input_ids"] == image_id).sum() == 16
    assert torch.equal(cut["labels"][cut["labels"] != -100], full["labels"][full["labels"] != -100])
    # a response that cannot fit even with the whole question gone is cut at its end, and counted
    long_answer = "there is a small nodule in the right upper zone and a pleural effusion in the left lower zone"
    cut = data.encode_rows(processor, [(pil, "Where?", long_answer)], max_length=30)
    assert cut["input_ids"].shape[1] == 30 and cut["truncated"].tolist() == [2]
    assert (cut["input_ids"] == image_id).sum() == 16
    with pytest.raises(ValueError, match="image tokens alone"):
        data.encode_rows(processor, [(pil, long_q, "yes")], max_length=10)
    with pytest.raises(ValueError, match="<image>"):
        data.encode_rows(processor, [(pil, long_q, "yes")], prompt_format="Q: {question}")


def test_read_pairs_skips_and_names_bad_lines(tmp_path):
    image = str(tmp_path / "x.png")
    data.to_pil(np.zeros((8, 8))).save(image)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    good = {"id": "a", "source": "text", "image": image, "rejected_image": None, "prompt": "q?", "chosen": "yes",
            "rejected": "no", "score": 7, "weight": 1.0}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({**good, "chosen": ""}),
                               json.dumps({**good, "score": None}), json.dumps({**good, "image": None}),
                               json.dumps({**good, "image": str(tmp_path / "gone.png")}),
                               json.dumps({**good, "rejected_image": str(tmp_path / "corrupt.png")})]) + "\n")
    messages = []
    pairs, skipped = data.read_pairs(str(path), messages.append)
    assert skipped == 5 and len(pairs) == 2 and pairs[1]["score"] is None
    assert any(":2: skipped, not JSON" in m for m in messages)
    assert any(":3: skipped" in m and "chosen" in m for m in messages)
    assert any("1 text pairs have no score" in m for m in messages)   # one summary line, not one per pair
    assert any(":6: skipped" in m and "gone.png" in m for m in messages)
    assert any(":7: skipped" in m and "corrupt.png" in m for m in messages)


def test_load_image_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ValueError, match="nope.png"):
        data.read_image(str(tmp_path / "nope.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        data.read_image(str(tmp_path / "bad.png"))


def test_visual_pairs_noise_inside_the_mask_only(world, tmp_path):
    images, qa = world
    by_id = {im["image_id"]: im for im in images}
    items = [q for q in qa if by_id[q["image_id"]]["findings"]][:3] + \
            [q for q in qa if not by_id[q["image_id"]]["findings"]][:1]
    store = synthetic.SyntheticStore(images, str(tmp_path / "images"))
    logs = []
    pairs = data.build_visual_pairs(items, store, str(tmp_path), data.heatmap_tool("mask", store=store, log=logs.append), log=logs.append)
    assert len(pairs) == 3 and "1 empty heatmap" in logs[0]  # the image without findings has nothing to noise
    for p, it in zip(pairs, items):
        assert p["chosen"] == p["rejected"] == it["answer"] and p["source"] == "visual" and 0 < p["score"] < 1
        assert data.read_image(p["heatmap"]).max() == 1.0               # the heatmap file is named in the pair
        clean, noised = data.read_image(p["image"]), data.read_image(p["rejected_image"])
        mask = by_id[it["image_id"]]["mask"].astype(bool)
        far = ~(torch.nn.functional.max_pool2d(torch.tensor(mask, dtype=torch.float32)[None, None], 7, 1, 3)[0, 0] > 0).numpy()
        assert np.array_equal(clean[far], noised[far])                  # untouched away from the lesion
        assert np.abs(clean[mask] - noised[mask]).mean() > 0.1          # noised on it


def test_a_visual_pair_whose_tool_sees_no_fall_is_dropped_or_kept(world, tmp_path):
    """The tool checks its own pairs: where its probability of the pair's finding does not fall on the noised
    image, the pair is counted and, with check="drop", left out; each kept pair records the fall."""
    images, qa = world
    by_id = {im["image_id"]: im for im in images}
    items = [q for q in qa if by_id[q["image_id"]]["findings"]][:4]
    store = synthetic.SyntheticStore(images, str(tmp_path / "images"))
    mask_tool = data.heatmap_tool("mask", store=store, log=lambda *a: None)
    seen = []

    def tool(item):
        return mask_tool(item)

    def check(item, noised):   # the first two "see" a fall, the others a rise
        seen.append(float(np.abs(noised - store.pixels(item["image_id"])).mean()))
        return (0.9, 0.5) if len(seen) <= 2 else (0.5, 0.6)
    tool.tool_name, tool.check = "scripted", check
    logs = []
    kept = data.build_visual_pairs(items, store, str(tmp_path / "a"), tool, log=logs.append, check="keep")
    assert [p["tool_fall"] for p in kept] == pytest.approx([0.4, 0.4, -0.1, -0.1]) and "2 tool's probability did not fall (kept)" in logs[-1]
    assert min(seen) > 0.001                       # the check sees the noised image, not the clean one
    seen.clear()
    dropped = data.build_visual_pairs(items, store, str(tmp_path / "b"), tool, log=logs.append, check="drop")
    assert [p["id"] for p in dropped] == [p["id"] for p in kept[:2]] and "2 tool's probability did not fall" in logs[-1]


def test_balanced_visual_items_give_a_rare_finding_its_share():
    rng = random.Random(0)
    shows = [{"id": f"a{i}", "f": "common"} for i in range(90)] + [{"id": f"b{i}", "f": "rare"} for i in range(6)] + \
            [{"id": f"c{i}", "f": ""} for i in range(30)]
    picked = data.visual_items(shows, 24, "balanced", rng, lambda it: it["f"])
    assert len(picked) == 24 and len({p["id"] for p in picked}) == 24
    counts = Counter(p["f"] for p in picked)
    assert counts == {"rare": 6, "common": 9, "": 9}          # the rare one all it has, the rest evenly
    assert len(data.visual_items(shows, 200, "balanced", rng, lambda it: it["f"])) == len(shows)
    randomly = data.visual_items(shows, 24, "random", random.Random(0))
    assert randomly == random.Random(0).sample(shows, 24)


def test_weights_are_normalized_per_source():
    pairs = [{"source": "text", "score": s} for s in (2, 4, 6, None)] + [{"source": "visual", "score": s} for s in (0.1, 0.9)]
    data.assign_weights(pairs)
    w = [p["weight"] for p in pairs]
    assert w[3] == 1.0                                         # unscored: neutral
    assert w[0] == pytest.approx(0.75) and w[1] == pytest.approx(1.0) and w[2] == pytest.approx(1.25)
    assert w[4] == pytest.approx(0.75) and w[5] == pytest.approx(1.25)  # its own scale
    data.assign_weights(pairs, "none")
    assert all(p["weight"] == 1.0 for p in pairs)
    data.assign_weights(pairs, "raw")                          # the score as it is; unscored still neutral
    assert [p["weight"] for p in pairs] == [2.0, 4.0, 6.0, 1.0, 0.1, 0.9]
    with pytest.raises(ValueError, match="unknown weighting"):
        data.assign_weights(pairs, "softmax")


def test_uniform_scores_are_reported_not_silent():
    logs = []
    pairs = data.assign_weights([{"source": "visual", "score": 1.0} for _ in range(3)], "z", logs.append)
    assert [p["weight"] for p in pairs] == [1.0] * 3 and "does nothing for visual pairs" in logs[0]


def test_mask_confidence_has_spread_with_contrast():
    from noise import mask_confidence
    rng = np.random.default_rng(0)
    background = 0.3 + 0.02 * rng.standard_normal((32, 32)).astype(np.float32)
    mask = np.zeros((32, 32), np.uint8)
    mask[12:20, 12:20] = 1
    faint, clear = background.copy(), background.copy()
    faint[mask > 0] += 0.02
    clear[mask > 0] += 0.4
    c_none, c_faint, c_clear = (mask_confidence(x, mask) for x in (background, faint, clear))
    assert c_none < 0.5 < c_clear and c_faint < c_clear and c_clear > 0.9
    assert mask_confidence(background, np.zeros_like(mask)) == 0.0


def test_vicuna_prompt_format_is_the_authors_conversation():
    prompt = data.format_prompt(None, "vicuna", "Is there a mass?")
    assert prompt.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert prompt.endswith("USER: <image>\nIs there a mass? ASSISTANT:")


def test_counterfactual_images_differ_only_where_the_finding_was(world):
    images, _ = world
    store = synthetic.SyntheticStore(images[:40], None)
    probes = [p for p in synthetic.counterfactual_probes(images[:40], 32, store) if p["qtype"] == "presence"]
    assert probes and len(probes) % 2 == 0
    for with_it, without in zip(probes[::2], probes[1::2]):
        assert (with_it["answer"], without["answer"]) == ("yes", "no") and with_it["question"] == without["question"]
        a, b = store.pixels(with_it["image_id"]), store.pixels(without["image_id"])
        im = store.by_id[with_it["image_id"]]
        hidden = next(f for f in im["findings"] if f["kind"] != "cardiomegaly")
        rng = np.random.default_rng()
        rng.bit_generator.state = im["render_state"]
        _, masks = synthetic.render_radiograph(im["findings"], 32, rng)
        mask = masks[im["findings"].index(hidden)].astype(bool)
        near = mask.copy()                                    # the lesion's soft edge: two pixels around its mask
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near |= np.roll(np.roll(mask, dy, 0), dx, 1)
        diff = np.abs(a - b)
        assert diff[~near].max() < 0.02 and diff[mask].mean() > 0.05


def test_laterality_images_move_the_finding_to_the_other_side_and_nothing_else(world):
    images, _ = world
    store = synthetic.SyntheticStore(images[:40], None)
    probes = [p for p in synthetic.counterfactual_probes(images[:40], 32, store) if p["qtype"] == "side"]
    assert len(probes) >= 20
    for one, other in zip(probes[::2], probes[1::2]):
        assert one["pair"] == other["pair"] and one["question"] == other["question"]
        im, mirrored = store.by_id[one["image_id"]], store.by_id[other["image_id"]]
        f = next(f for f in im["findings"] if f["kind"] != "cardiomegaly")
        g = next(g for g in mirrored["findings"] if g["kind"] == f["kind"])
        assert g["side"] != f["side"] and g["level"] == f["level"]
        asked = one["question"].split(" in the ")[1].split()[0]
        assert (one["answer"], other["answer"]) == (("yes", "no") if asked == f["side"] else ("no", "yes"))
        changed = np.abs(store.pixels(one["image_id"]) - store.pixels(other["image_id"])) > 0.02
        assert changed.any() and not (changed & ~near_mask(im["mask"] | mirrored["mask"])).any()


def near_mask(mask, r=2):
    """The mask and r pixels around it (a lesion's soft edge)."""
    near = mask.astype(bool).copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            near |= np.roll(np.roll(mask.astype(bool), dy, 0), dx, 1)
    return near


def window_batch(processor, answers):
    """Pairs of rows (chosen, rejected) of one question on blank images, collated as a training batch."""
    from PIL import Image
    rows = [(Image.new("L", (32, 32), 40 * i), "Is there a mass?", a) for i, a in enumerate(answers)]
    enc = data.encode_rows(processor, rows)
    return {k: v for k, v in enc.items() if k != "truncated"}


def test_logits_only_at_response_positions_give_the_full_paths_values(world):
    """The forward projects only the positions that predict a response token (position t predicts t+1),
    and the log-probs, masks and logits there equal the full path's, on the tiny LLaVA."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, processor = synthetic.build_tiny(synthetic.corpus_of(*world), 32)
    model.eval()
    batch = window_batch(processor, ["yes", "There is a mass in the left upper zone.", "no", "a mass"])
    start = data.response_start(batch)
    first_response = int((batch["labels"] != data.IGNORE_INDEX).float().argmax(1).min())
    assert start == first_response - 1 > 16                       # after the 16 image tokens and the question
    projected = []                                                 # what the vocabulary projection computed
    model.lm_head.register_forward_hook(lambda m, i, out: projected.append(out.shape[1]))
    with torch.no_grad():
        logits, tokens, mask = data.response_logps(model, batch, 2)
        full_logits, full_tokens, full_mask = data.response_logps(model, batch, 2, start=0)
    T = batch["input_ids"].shape[1]
    assert projected == [T - start, T]
    assert logits.shape[2] == T - start and full_logits.shape[2] == T
    assert torch.equal(mask, full_mask[:, :, start:]) and not full_mask[:, :, :start].any()
    torch.testing.assert_close(tokens, full_tokens[:, :, start:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.sum(-1), full_tokens.sum(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits, full_logits[:, :, start:], atol=1e-5, rtol=1e-5)


def test_logits_window_at_a_real_vocabulary():
    """The same at LLaVA-Med's vocabulary (32,000), on a randomly initialised LLaVA of tiny width."""
    from lab.bench import real_shapes_model, real_shapes_batch
    model = real_shapes_model(hidden=32, layers=1, image_size=28, generator_seed=0).eval()
    batch = real_shapes_batch(model.config, pairs=2, prompt_text=12, answer=7, seed=0)
    with torch.no_grad():
        _, tokens, mask = data.response_logps(model, batch, 2)
        _, full_tokens, full_mask = data.response_logps(model, batch, 2, start=0)
    start = data.response_start(batch)
    assert model.config.text_config.vocab_size == 32000 and start > 0
    assert torch.equal(mask, full_mask[:, :, start:])
    torch.testing.assert_close(tokens.sum(-1), full_tokens.sum(-1), atol=1e-4, rtol=1e-5)


def test_real_shapes_processor_expands_the_image_at_the_real_vocabulary():
    """lab/bench_trl.py's processor for the real-shapes model: 576 image tokens, words within the vocabulary."""
    from PIL import Image
    from lab.bench import real_shapes_model
    from lab.bench_trl import real_shapes_processor
    config = real_shapes_model(hidden=64, layers=1).config
    processor = real_shapes_processor(config)
    enc = processor(images=[Image.new("RGB", (336, 336))], text=["<image> w5 w31998"], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids.count(config.image_token_id) == 576 and ids[-2:] == [5, 31998]
    assert enc["pixel_values"].shape == (1, 3, 336, 336)
