"""The CLIP VQA prompt module: question context placement, answer candidates by question kind,
prompt-only state, the fusion, and closed/open accuracy computed exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedprompt.tasks.clip.vqa import QuestionData
from fedprompt.training.gradient import evaluate
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_text_context import FixedClassText, TextContext
from prompt_modules.clip_vqa import MASKED, CLIPVQAModel, JointQuery, QuestionContext, context_start
from prompt_modules.visual_prompts import FrozenImage, VisualTokenPrompt, vpt_init

ANSWERS = ["blue", "green", "no", "red", "yes"]


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    return OpenCLIPBackbone.load(str(tiny_clip.config), str(tiny_clip.checkpoint))


def make_model(backbone, image=None, answer=None, fusion="mlp", num_context=4):
    torch.manual_seed(0)
    question = QuestionContext(torch.randn(num_context, backbone.text_width) * 0.02)
    answer = answer or TextContext(torch.randn(2, backbone.text_width) * 0.02)
    return CLIPVQAModel(
        backbone,
        question,
        answer,
        image or FrozenImage(),
        JointQuery(fusion, backbone.embed_dim, 16),
        ANSWERS,
        closed_answers=["no", "yes"],
        open_answers=["blue", "green", "red"],
    )


def batch_for(model, questions, closed, features=None):
    ids = model.tokenize_questions(questions)
    count = len(questions)
    features = features if features is not None else torch.randn(count, model.backbone.embed_dim)
    return {"image_features": features, "question_ids": ids, "closed": torch.tensor(closed)}


def test_question_context_goes_after_the_start_token(backbone):
    """With the placeholders' own embeddings as context, the prompted pass is CLIP's plain pass."""
    questions = ["what color is the square?", "is the square red?"]
    model = make_model(backbone, num_context=3)
    ids = model.tokenize_questions(questions)
    start = context_start(backbone)
    placeholder = backbone.token_embeddings(ids[:1, start : start + 3])[0]
    model.question.context.data.copy_(placeholder)
    with torch.no_grad():
        prompted = model.question.features(backbone, ids, start)
        plain = backbone.encode_text([f"X X X {q}" for q in questions])
    torch.testing.assert_close(prompted, plain)
    assert int(backbone.pooled_positions(ids).max()) == ids.shape[1] - 1  # cut after the last end-of-text


def test_closed_questions_only_ever_answer_yes_or_no(backbone):
    model = make_model(backbone)
    closed = [True, False] * 16
    batch = batch_for(model, ["is it red?", "what color is it?"] * 16, closed)
    with torch.no_grad():
        logits = model(batch)
    predicted = [ANSWERS[i] for i in logits.argmax(1).tolist()]
    assert all(p in ("yes", "no") for p, c in zip(predicted, closed, strict=True) if c)
    assert all(p in ("blue", "green", "red") for p, c in zip(predicted, closed, strict=True) if not c)
    assert torch.all(logits[0, [0, 1, 3]] == MASKED) and torch.all(logits[1, [2, 4]] == MASKED)


def test_state_dict_is_the_prompt_alone(backbone, tiny_clip):
    image = VisualTokenPrompt(vpt_init(backbone, 1, 2, torch.Generator().manual_seed(0)))
    model = make_model(backbone, image=image)
    assert set(model.state_dict()) == {
        "question.context",
        "answer.context",
        "image.prompts",
        "fusion.mlp.0.weight",
        "fusion.mlp.0.bias",
        "fusion.mlp.2.weight",
        "fusion.mlp.2.bias",
    }
    fixed = make_model(backbone, answer=FixedClassText("{}"), fusion="sum")
    assert set(fixed.state_dict()) == {"question.context"}
    groups = model.param_groups()
    assert [len(g["params"]) for g in groups] == [2, 1, 4]  # text (question, answer), image, fusion


def test_mlp_fusion_starts_as_the_normalised_sum():
    torch.manual_seed(1)
    image, question = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    expected = F.normalize(image + question, dim=-1)
    torch.testing.assert_close(JointQuery("mlp", 8, 4)(image, question), expected)
    torch.testing.assert_close(JointQuery("sum", 8)(image, question), expected)


def test_closed_and_open_accuracy_are_computed_exactly(backbone):
    """Six questions with known predictions: closed 2 of 3 right, open 1 of 3, overall 3 of 6."""
    model = make_model(backbone, answer=FixedClassText("{}"), fusion="sum")
    dim = backbone.embed_dim
    basis = torch.eye(dim)[: len(ANSWERS)]  # answer a's features: the a-th unit vector
    model.answer_features = lambda: basis
    predicted = ["yes", "no", "no", "red", "blue", "yes"]  # the last: open, so yes is masked
    closed = [True, True, True, False, False, False]
    query = torch.stack([basis[ANSWERS.index(p)] for p in predicted])
    query[5] = basis[ANSWERS.index("yes")] + 0.5 * basis[ANSWERS.index("green")]
    model.query = lambda batch: batch["image_features"]
    truth = ["yes", "yes", "no", "blue", "blue", "red"]  # right: 0, 2 (closed); 4 (open); row 5 says green
    data = QuestionData(
        {
            "image_features": query,
            "question_ids": torch.zeros(6, 4, dtype=torch.long),
            "closed": torch.tensor(closed),
            "labels": torch.tensor([ANSWERS.index(t) for t in truth]),
            "image_index": torch.arange(6),
        }
    )
    subsets = {"closed": [0, 1, 2], "open": [3, 4, 5]}
    results = {
        name: evaluate(model, data.subset(rows), 4, "cpu")["accuracy"] for name, rows in subsets.items()
    }
    overall = evaluate(model, data, 4, "cpu")["accuracy"]
    assert results == {"closed": 2 / 3, "open": 1 / 3} and overall == 3 / 6


def test_question_data_reads_images_from_the_shared_table():
    table = torch.arange(3 * 2, dtype=torch.float32).reshape(3, 2)
    data = QuestionData(
        {"labels": torch.tensor([0, 1, 2, 3]), "image_index": torch.tensor([2, 0, 2, 1])},
        {"image_features": table},
    )
    part = data.subset([3, 0])
    assert part.images["image_features"] is table
    (batch,) = list(part.batches(8))
    torch.testing.assert_close(batch["image_features"], table[[1, 2]])
    torch.testing.assert_close(batch["labels"], torch.tensor([3, 0]))


def test_a_vqa_model_scores_its_own_answers_only(backbone):
    model = make_model(backbone)
    with model.scoring(ANSWERS):
        pass
    with pytest.raises(ValueError, match="its own answer vocabulary"), model.scoring(["a", "b"]):
        pass
    with pytest.raises(ValueError, match=r"candidate answers \['maybe'\] are not among the answers"):
        CLIPVQAModel(
            backbone, model.question, model.answer, model.image, model.fusion, ANSWERS, ["maybe"], []
        )
