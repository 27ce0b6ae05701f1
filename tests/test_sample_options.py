"""`sample.SamplingOptions`, the one object `imgen sample`, `edit` and `eval` build from their flags: its checks name
the flag in one sentence, and the keyword arguments it gives a family's method are the images' whole recipe."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from imgen_cli.errors import UserError
from imgen_cli.sample import SamplingOptions, batch_generator, generate, parse_steps


def refusal(options: SamplingOptions, method, family: str = "bitdiff") -> str:
    with pytest.raises(UserError) as caught:
        options.check(method, family)
    return str(caught.value)


def test_a_flag_the_familys_method_does_not_take_is_refused_by_its_name() -> None:
    model = tiny_model("bitdiff")
    assert refusal(SamplingOptions(truncation=0.5), model.generate) == "the bitdiff family does not take --truncation."
    assert refusal(SamplingOptions(guidance_ramp=True), model.generate) == \
        "the bitdiff family does not take --guidance-ramp."
    assert refusal(SamplingOptions(iterations=3), model.edit) == "the bitdiff family does not take --iterations."

    def generate_without_negatives(prompts: list[str], *, steps: int = 1, generator: torch.Generator | None = None):
        return prompts

    assert refusal(SamplingOptions(negative="a cat"), generate_without_negatives) == \
        "the bitdiff family does not take --negative."  # the flag, not the keyword it becomes
    SamplingOptions(steps=(4,), guidance=2.0, negative="a cat", sampler="ddim").check(model.generate, "bitdiff")


def test_muse_lists_its_options_so_a_flag_it_lacks_is_one_sentence() -> None:
    """Muse's methods once took **options: --truncation then reached its decoder as a TypeError traceback."""
    muse = tiny_model("muse")
    for method in (muse.generate, muse.edit):
        assert refusal(SamplingOptions(truncation=0.5), method, "muse") == "the muse family does not take --truncation."
    SamplingOptions(guidance_ramp=True, negative="a cat").check(muse.generate, "muse")
    SamplingOptions(guidance_ramp=True, negative="a cat", iterations=2).check(muse.edit, "muse")


def test_values_no_sampler_can_use_are_refused() -> None:
    method = tiny_model("vqdiffusion").generate
    for guidance in (math.nan, math.inf, -1.0):
        assert refusal(SamplingOptions(guidance=guidance), method, "vqdiffusion") == \
            f"--guidance must be a finite scale >= 0 (1 = no guidance, 0 = unconditional), got {guidance}."
    for truncation in (0.0, 1.5):
        assert refusal(SamplingOptions(truncation=truncation), method, "vqdiffusion") == \
            f"--truncation is the probability mass kept, in (0, 1], got {truncation}."
    SamplingOptions(guidance=0.0, truncation=1.0).check(method, "vqdiffusion")
    with pytest.raises(UserError, match=r"^--steps must be from 1 to 10000, got 0\.$"):
        SamplingOptions(steps=parse_steps("4,0"))


def test_the_keywords_are_the_options_set_under_the_methods_names() -> None:
    options = SamplingOptions(steps=(4, 8), guidance=3.0, guidance_ramp=True, negative="a green cross", seed=5)
    assert options.keywords(8, images=2) == {"steps": 8, "guidance": 3.0, "guidance_ramp": True,
                                             "negative_prompts": ["a green cross"] * 2}
    assert SamplingOptions(iterations=3, truncation=0.5, sampler="purity").keywords(None) == \
        {"iterations": 3, "truncation": 0.5, "sampler": "purity"}
    assert parse_steps(None) == (None,) and parse_steps("4, 8,") == (4, 8)


def test_generated_batches_call_the_family_with_the_options_and_the_seed_of_each_batch() -> None:
    """Batch b of 3 prompts in batches of 2 is the family's `generate` of those prompts under the generator of
    (seed, b): the images depend on the options and the seed, not on the command that asked."""
    model = tiny_model("muse")
    prompts = ["a red circle", "a blue square", "a green cross"]
    options = SamplingOptions(guidance=2.0, negative="a yellow star", seed=7, batch_size=2)
    images = generate(model, prompts, options, 2, advance=lambda k: None)
    with torch.no_grad():
        expected = torch.cat([model.generate(prompts[:2], steps=2, guidance=2.0, negative_prompts=["a yellow star"] * 2,
                                             generator=batch_generator(7, 0, torch.device("cpu"))),
                              model.generate(prompts[2:], steps=2, guidance=2.0, negative_prompts=["a yellow star"],
                                             generator=batch_generator(7, 1, torch.device("cpu")))])
    assert torch.equal(images, expected.float().clamp(0, 1))
