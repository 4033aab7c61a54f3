"""Readers (train/data.py), each task's field detection and examples (train/tasks/), label maps, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.train.batching import length_grouped_batches
from lorakit.train.data import DataError, detect_format, read_records
from lorakit.train.tasks import Fields, build_label_map, group_references, resolve_fields, to_examples

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- readers


def test_jsonl_skips_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    assert read_records(path) == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]


def test_json_array_file(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r["text"] for r in read_records(path)] == ["a", "b"]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b",}\n')
    with pytest.raises(DataError, match="line 2"):
        read_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2.*JSON object"):
        read_records(path)


def test_csv_quoted_multiline_fields_and_huge_field(tmp_path):
    huge = "x" * 200_000  # above csv's default 128 KiB field limit
    path = write(tmp_path / "d.csv", f'text,label\n"line one\nline, two",1\n{huge},0\n')
    records = read_records(path)
    assert records[0] == {"text": "line one\nline, two", "label": "1"}
    assert records[1]["text"] == huge


def test_tsv_delimiter_from_extension(tmp_path):
    path = write(tmp_path / "d.tsv", 'sentence\tlabel\n"a, b\n\tc"\t1\nplain\t0\n')
    assert read_records(path) == [{"sentence": "a, b\n\tc", "label": "1"}, {"sentence": "plain", "label": "0"}]


def test_csv_header_only_is_empty(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\n")
    with pytest.raises(DataError, match="no records"):
        read_records(path)


def test_csv_without_header_is_an_error(tmp_path):
    with pytest.raises(DataError, match="header"):
        read_records(write(tmp_path / "d.csv", ""))


def test_csv_row_with_wrong_field_count(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,1\nb,c,0\n")
    with pytest.raises(DataError, match="line 3: 3 fields but the header has 2"):
        read_records(path)


def test_conll_last_column_docstart_and_no_trailing_blank(tmp_path):
    text = (
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
        "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER"
    )
    records = read_records(write(tmp_path / "d.conll", text))
    assert records == [
        {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
    ]


def test_conll_line_without_tag_names_the_line(tmp_path):
    path = write(tmp_path / "d.txt", "EU B-ORG\nrejects\n")
    with pytest.raises(DataError, match="line 2.*no tag"):
        read_records(path)


def test_e2e_is_detected_for_txt_with_double_bars(tmp_path):
    path = write(
        tmp_path / "e2e.txt", "name : A | food : Thai||A serves Thai . \nname : A | food : Thai||Thai at A .\n"
    )
    assert detect_format(path) == "e2e"
    assert read_records(path) == [
        {"mr": "name : A | food : Thai", "ref": "A serves Thai ."},
        {"mr": "name : A | food : Thai", "ref": "Thai at A ."},
    ]


def test_explicit_format_overrides_extension(tmp_path):
    path = write(tmp_path / "data.dat", '{"text": "a"}\n')
    assert read_records(path, fmt="jsonl") == [{"text": "a"}]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        read_records(missing)


def test_unknown_extension_lists_supported(tmp_path):
    path = write(tmp_path / "d.xlsx", "x")
    with pytest.raises(DataError, match=r"'\.xlsx'.*\.jsonl.*\.csv.*\.tsv"):
        read_records(path)


def test_unknown_format_name(tmp_path):
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        read_records(write(tmp_path / "d.jsonl", "{}"), fmt="xml")


def test_hf_saved_dataset_decodes_class_labels(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER"])),
            "label": datasets.ClassLabel(names=["neg", "pos"]),
        }
    )
    rows = {"tokens": [["Ann", "runs"], ["x"]], "ner_tags": [[1, 0], [0]], "label": [1, -1]}
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    splits["test"] = splits["train"]
    splits.save_to_disk(str(tmp_path / "ds"))

    records = read_records(tmp_path / "ds", split="train")
    assert records[0] == {"tokens": ["Ann", "runs"], "ner_tags": ["B-PER", "O"], "label": "pos"}
    assert records[1]["label"] == "-1"  # unlabeled rows keep their marker
    with pytest.raises(DataError, match="available splits: train, test"):
        read_records(tmp_path / "ds")


def test_hub_name_with_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_records("glue:sst2", split="validation") == [{"sentence": "a", "label": 0}]
    assert read_records("imdb", split="test", fmt="hf") == [{"sentence": "a", "label": 0}]
    assert calls == [("glue", "sst2", "validation"), ("imdb", None, "test")]


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def failing_load_dataset(*args, **kwargs):
        raise FileNotFoundError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match="could not load Hugging Face dataset 'some/name'.*offline"):
        read_records("some/name", split="train")


# --------------------------------------------------------------------------- fields


@pytest.mark.parametrize(
    ("columns", "task", "expected"),
    [
        (["sentence", "label"], "classification", Fields("classification", text="sentence", label="label")),
        (["idx", "Review", "class"], "classification", Fields("classification", text="Review", label="class")),
        (
            ["premise", "hypothesis", "label"],
            "classification",
            Fields("classification", text="premise", pair="hypothesis", label="label"),
        ),
        (["id", "tokens", "ner_tags"], "ner", Fields("ner", text="tokens", label="ner_tags")),
        (["words", "labels"], "ner", Fields("ner", text="words", label="labels")),
        (["prompt", "response"], "causal-lm", Fields("causal-lm", text="prompt", label="response")),
        (
            ["instruction", "input", "output"],
            "causal-lm",
            Fields("causal-lm", text="instruction", pair="input", label="output"),
        ),
        (["question", "answer"], "causal-lm", Fields("causal-lm", text="question", label="answer")),
        (["text"], "causal-lm", Fields("causal-lm", text="text")),
        (["messages", "id"], "causal-lm", Fields("causal-lm", messages="messages")),
        (["mr", "ref"], "causal-lm", Fields("causal-lm", text="mr", label="ref")),
        (["source", "target"], "seq2seq", Fields("seq2seq", text="source", label="target")),
        (["document", "summary", "id"], "seq2seq", Fields("seq2seq", text="document", label="summary")),
        (["mr", "ref"], "seq2seq", Fields("seq2seq", text="mr", label="ref")),
        (
            ["meaning_representation", "human_reference"],
            "seq2seq",
            Fields("seq2seq", text="meaning_representation", label="human_reference"),
        ),
    ],
)
def test_resolve_fields_detects_common_names(columns, task, expected):
    assert resolve_fields([dict.fromkeys(columns, "x")], task) == expected


def test_resolve_fields_overrides():
    records = [{"body_text": "a", "stars": 5, "sentence2": "b", "sentence1": "c"}]
    fields = resolve_fields(records, "classification", text_field="body_text", label_field="stars")
    assert fields == Fields("classification", text="body_text", label="stars")  # no auto pair with an override
    fields = resolve_fields(
        records, "classification", text_field="sentence1", pair_field="body_text", label_field="stars"
    )
    assert (fields.text, fields.pair) == ("sentence1", "body_text")


def test_causal_lm_label_override_finds_the_prompt():
    fields = resolve_fields([{"prompt": "p", "chosen": "c", "rejected": "r"}], "causal-lm", label_field="chosen")
    assert fields == Fields("causal-lm", text="prompt", label="chosen")


def test_missing_override_column_lists_columns_and_option():
    with pytest.raises(
        DataError, match=r"'body' \(--text-field\) not found in train.csv; columns are: sentence, label"
    ):
        resolve_fields([{"sentence": "a", "label": 1}], "classification", text_field="body", source="train.csv")


def test_undetectable_column_names_option():
    with pytest.raises(DataError, match=r"no label column.*columns are: sentence, stars\. Set --label-field"):
        resolve_fields([{"sentence": "a", "stars": 1}], "classification")


def test_resolve_fields_unknown_task_and_empty_records():
    with pytest.raises(DataError, match="unknown task 'regression'"):
        resolve_fields([{"text": "a"}], "regression")
    with pytest.raises(DataError, match="no records"):
        resolve_fields([], "classification")


# --------------------------------------------------------------------------- examples


def test_classification_examples_keep_labels_as_strings():
    records = [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "c", "sentence2": "d", "label": "0"}]
    examples = to_examples(records, resolve_fields(records, "classification"))
    assert examples == [
        {"text": "a", "text_pair": "b", "label": "1"},
        {"text": "c", "text_pair": "d", "label": "0"},
    ]


def test_missing_value_names_the_row():
    records = [{"text": "a", "label": 1}, {"text": "b", "label": None}]
    with pytest.raises(DataError, match="train.jsonl, row 2: no value in column 'label'"):
        to_examples(records, Fields("classification", text="text", label="label"), source="train.jsonl")


def test_ner_examples_and_length_mismatch():
    fields = Fields("ner", text="tokens", label="tags")
    assert to_examples([{"tokens": "EU rejects", "tags": ["B-ORG", "O"]}], fields) == [
        {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}
    ]
    with pytest.raises(DataError, match="row 1: 2 tokens but 1 tags"):
        to_examples([{"tokens": ["EU", "rejects"], "tags": ["O"]}], fields)


def test_causal_lm_examples():
    alpaca = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Greet.", "input": "", "output": "hi"},
    ]
    assert to_examples(alpaca, resolve_fields(alpaca, "causal-lm")) == [
        {"prompt": "Add.\n\n1 2", "response": "3"},
        {"prompt": "Greet.", "response": "hi"},
    ]
    assert to_examples([{"text": "doc"}], Fields("causal-lm", text="text")) == [{"prompt": "", "response": "doc"}]


def test_chat_examples_and_bad_messages():
    chat = [{"messages": [{"role": "user", "content": "hi", "name": "u"}, {"role": "assistant", "content": "hey"}]}]
    fields = resolve_fields(chat, "causal-lm")
    assert to_examples(chat, fields) == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    ]
    with pytest.raises(DataError, match="row 1: column 'messages' must hold lists"):
        to_examples([{"messages": [{"from": "human", "value": "hi"}]}], fields)


def test_seq2seq_examples_and_reference_groups(tmp_path):
    path = write(tmp_path / "e2e.txt", "mr1||ref a\nmr2||ref b\nmr1||ref c\n")
    records = read_records(path)
    examples = to_examples(records, resolve_fields(records, "seq2seq"))
    assert examples[0] == {"source": "mr1", "target": "ref a"}
    groups = group_references(examples)
    assert groups == {"mr1": ["ref a", "ref c"], "mr2": ["ref b"]}
    assert list(groups) == ["mr1", "mr2"]  # first-seen order


# --------------------------------------------------------------------------- labels


def test_label_map_sorts_integers_numerically():
    examples = [{"label": label} for label in ["10", "2", "0", "2"]]
    assert build_label_map(examples) == ["0", "2", "10"]


def test_label_map_sorts_strings_and_ner_tags():
    assert build_label_map([{"label": "pos"}, {"label": "neg"}]) == ["neg", "pos"]
    assert build_label_map([{"tags": ["O", "B-PER"]}, {"tags": ["I-PER"]}]) == ["B-PER", "I-PER", "O"]


def test_label_map_rejects_labels_unseen_in_training():
    train = [{"tags": ["O", "B-PER"]}]
    dev = [{"tags": ["B-LOC", "O", "B-MISC"]}]
    with pytest.raises(DataError, match=r"'B-LOC', 'B-MISC' in dev.txt never occur"):
        build_label_map(train, dev, eval_source="dev.txt")
    assert build_label_map(train, [{"tags": ["O"]}]) == ["B-PER", "O"]


# --------------------------------------------------------------------------- batching


def test_length_grouped_batches_partition_and_determinism():
    lengths = [(i * 37) % 101 for i in range(1003)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(1003))
    assert sorted(len(batch) for batch in batches) == [3] + [8] * 125
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4)


def test_length_grouped_batches_group_similar_lengths():
    # One mega-chunk: batches are consecutive runs of the length-sorted indices, so their
    # length ranges cannot overlap.
    lengths = [(i * 7919) % 1000 for i in range(64)]
    batches = length_grouped_batches(lengths, batch_size=4, seed=0, mega_batches=16)
    ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(ranges, ranges[1:]))
    assert [len(b) for b in batches] == [4] * 16


def test_length_grouped_batches_without_shuffle():
    lengths = [1, 5, 3, 4, 2]
    assert length_grouped_batches(lengths, batch_size=2, seed=0, shuffle=False) == [[1, 3], [2, 4], [0]]


def test_length_grouped_batches_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches([1, 2], batch_size=0, seed=0)


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.parametrize(
    ("relative", "task", "rows"),
    [
        ("sst2/train.tsv", "classification", 67_349),
        ("sst2/dev.tsv", "classification", 872),
        ("conll2003/train.txt", "ner", 14_041),
        ("conll2003/dev.txt", "ner", 3_250),
        ("e2e/train.txt", "seq2seq", 4_672),
        ("e2e/test.txt", "seq2seq", 4_693),
    ],
)
def test_shared_data_row_counts(relative, task, rows):
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent: the shared data sets live in ../shared/data next to the repository")
    records = read_records(path)
    examples = to_examples(records, resolve_fields(records, task, source=relative), source=relative)
    assert len(examples) == rows
    if task != "seq2seq":
        assert build_label_map(examples)  # every example has a usable label
