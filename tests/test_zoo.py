import numpy as np
import pytest
import torch

from revelio.zoo import ModelUnavailable, ZOO_NAMES, load_pipeline, zoo_path


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_pipeline_generates_and_reloads(name, tmp_path):
    pipe = load_pipeline(name, random_init=True)
    kw = {} if name == "tiny-sd" else {"max_sequence_length": 32}

    def gen(p):
        return p("a red circle and a blue square", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0), **kw).images

    a = gen(pipe)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    pipe.save_pretrained(tmp_path / name)
    b = gen(load_pipeline(str(tmp_path / name)))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_random_build_is_seeded(tmp_path):
    p0, p1 = zoo_path("tiny-sd", random_init=True, seed=0), zoo_path("tiny-sd", random_init=True, seed=1)
    assert p0 != p1 and (p0 / "model_index.json").exists()


def test_tokenizers_know_the_shapes_words():
    pipe = load_pipeline("tiny-flux", random_init=True)
    ids = pipe.tokenizer("a red circle").input_ids
    assert len(ids) == 5  # bos, 3 whole words, eos
    ids2 = pipe.tokenizer_2("a red circle").input_ids
    assert len(ids2) == 4  # 3 words + </s>
    assert len(pipe.tokenizer("a zebra").input_ids) > 4  # unknown words still tokenize (by characters)


def test_unavailable_model_says_what_to_pass():
    with pytest.raises(ModelUnavailable, match="zoo name"):
        load_pipeline("some-org/not-a-real-model")
    with pytest.raises(ModelUnavailable, match="not a zoo model"):
        zoo_path("tiny-nothing")


def test_generation_kwargs_fit_the_pipeline_family(tiny_sd, tiny_flux):
    from revelio.zoo import generation_kwargs

    # tiny-flux: trained on 32 T5 tokens and without a guidance embedding -> true CFG
    assert generation_kwargs(tiny_flux, 4.0) == {"max_sequence_length": 32, "true_cfg_scale": 4.0,
                                                 "negative_prompt": ""}
    assert generation_kwargs(tiny_flux, 4.0, batch=2)["negative_prompt"] == ["", ""]
    assert generation_kwargs(tiny_flux, 1.0) == {"max_sequence_length": 32}  # no guidance asked
    assert generation_kwargs(tiny_sd, 4.0) == {"guidance_scale": 4.0}
    assert generation_kwargs(tiny_sd) == {}
