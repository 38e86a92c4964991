"""Datasets, prompt sampling and config validation: bad input is named precisely."""

import json

import pytest

from trainer.__main__ import policy_from_environ
from trainer.config import ConfigError, GRPOConfig, OperatorPolicy, RunConfig, spec_hyperparameters
from trainer.data import PromptSampler, RowFile, chat_row, json_over_limits, parse_line, parse_rows
from trainer.errors import DatasetError


def test_rows_keep_every_field_and_accept_chat_prompts():
    rows = parse_rows(
        [
            '{"prompt": "1+1?", "answer": "2", "tests": ["assert True"]}',
            "",
            '{"prompt": [{"role": "user", "content": "hi"}]}',
        ]
    )
    assert rows[0]["answer"] == "2" and rows[0]["tests"] == ["assert True"]
    assert rows[1]["prompt"][0]["role"] == "user"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', "{not json"], "line 2: not valid JSON"),
        (['{"prompt": "ok"}', '{"question": "x"}'], "line 2: missing 'prompt'"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (['{"prompt": "  "}'], "line 1: 'prompt' is empty"),
        (['{"prompt": [{"role": "user"}]}'], "line 1: 'prompt'[0] must be a message"),
        ([""], "no rows"),
    ],
)
def test_malformed_rows_are_reported_with_their_line(lines, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_rows(lines)


@pytest.mark.parametrize(
    ("line", "over"),
    [
        (b'{"prompt": "x", "answer": [1, 2, {"a": [3]}]}', None),
        (b'{"prompt": "[[[[{{{{,,,,\\"[[[", "x": "\\\\"}', None),  # brackets and commas in strings are text
        (b"[" * 4 + b"]" * 4, None),
        (b"[" * 5 + b"]" * 5, "depth"),
        (b'{"a": {"b": {"c": {"d": {"e": 1}}}}}', "depth"),
        (b'{"a": "' + b"[" * 50 + b'"}', None),
        (b"[" + b"1," * 18 + b"1]", None),  # 19 numbers + the list
        (b"[" + b"1," * 19 + b"1]", "values"),
        (b"[" + b"[]," * 10 + b"[]]", "values"),  # empty containers count
        (b"[" * 100_000, "values"),
        (b'"' + b'\\"' * 1000, None),  # an unterminated string: the parser's to report
        (b"[" * 10 + b"}" * 10, None),  # unbalanced: the parser's to report
    ],
)
def test_json_shape_is_read_off_the_bytes(line, over):
    assert json_over_limits(line, max_depth=4, max_values=20) == over


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[" * 100_000 + "]" * 100_000, "line 7: not valid JSON: nested too deeply"),
        (
            '{"prompt": ' + "9" * 5000 + "}",
            "line 7: 'prompt' is an integer of 5000 digits, more than the 4300",
        ),
    ],
)
def test_json_the_parser_cannot_read_is_a_dataset_error(text, says):
    with pytest.raises(DatasetError, match=says.replace("(", r"\(")) as caught:
        parse_line(text, 7)
    assert "sys.set_int_max_str_digits" not in str(caught.value)  # Python's advice is not the user's


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"prompt": "a", "answer": NaN}', "line 4: 'answer' is NaN, which JSON does not allow"),
        ('{"prompt": "a", "answer": Infinity}', "line 4: 'answer' is Infinity, which JSON does not allow"),
        ('{"prompt": "a", "x": [1, {"y": -Infinity}]}', "line 4: 'x'[1]['y'] is -Infinity"),
        ('{"prompt": "a", "answer": 1e400}', "line 4: 'answer' is 1e400, beyond a 64-bit float's range"),
        (
            '{"prompt": "a", "answer": -' + "9" * 400 + ".0}",
            "line 4: 'answer' is -99999999999…999999.0, beyond",
        ),
        ('{"prompt": "a", "n": [1, -' + "7" * 4301 + "]}", "line 4: 'n'[1] is an integer of 4301 digits"),
        ("NaN", "line 4: the row is NaN"),
        ('{"prompt": "a", "x": NaN, "x": 1}', "line 4: a value is NaN"),  # the line still holds it
    ],
)
def test_numbers_that_are_not_json_are_refused_naming_the_field(text, says):
    """Python reads NaN, Infinity and 1e400 (as inf), which no JSON reader after it would: a row
    must read back as the JSON it is stored as."""
    with pytest.raises(DatasetError) as caught:
        parse_line(text, 4)
    assert str(caught.value).startswith(says), str(caught.value)


def test_numbers_json_allows_are_read_as_they_are():
    row = parse_line('{"prompt": "a", "f": 1.5e300, "tiny": 1e-400, "i": -' + "7" * 4300 + ', "z": -0}', 1)
    assert row["f"] == 1.5e300 and row["tiny"] == 0.0 and row["i"] == -int("7" * 4300) and row["z"] == 0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # a line cut short ends in its newline: the error is at its end, not at "column 1" of the next
        (
            '{"prompt": "hi", \n',
            "(Expecting property name enclosed in double quotes at the end of the line, column 18)",
        ),
        ('{"prompt": "hi",\r\n', "at the end of the line, column 17)"),
        ('{"prompt": "hi" "x"}\n', "(Expecting ',' delimiter at column 17)"),
        ('{"prompt": "\u00e9", x}\n', "at column 17)"),  # characters, as an editor counts them, not bytes
    ],
)
def test_a_malformed_line_names_the_column_an_editor_shows(text, says):
    with pytest.raises(DatasetError) as caught:
        parse_line(text, 3)
    assert str(caught.value).startswith("line 3: not valid JSON") and says in str(caught.value), str(
        caught.value
    )


def test_a_byte_order_mark_before_the_first_row_is_skipped(tmp_path):
    assert parse_line('\ufeff{"prompt": "a"}\n', 1) == {"prompt": "a"}
    rows = RowFile(rows_file(tmp_path / "d.jsonl", ['\ufeff{"prompt": "a"}\n{"prompt": "b"}\n'.encode()]))
    assert [row["prompt"] for row in rows] == ["a", "b"]
    rows.close()
    # a file that starts with the mark and a blank line (CRLF): the blank line is blank
    assert parse_line("\ufeff\r\n", 1) is None
    rows = RowFile(rows_file(tmp_path / "e.jsonl", ['\ufeff\r\n{"prompt": "a"}\r\n'.encode()]))
    assert [row["prompt"] for row in rows] == ["a"]
    rows.close()


def test_a_chat_format_row_has_its_messages_before_a_final_assistant_one_as_prompt():
    chat = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": "4"},
        ],
        "answer": "4",
    }
    row = parse_line(json.dumps(chat), 1)
    assert row["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert row["completion"] == "4" and row["messages"] == chat["messages"] and row["answer"] == "4"
    # a prompt given wins where rows are read to train (an upload refuses one that differs: below);
    # a row's own completion is kept; no final assistant message, no completion
    assert parse_line(json.dumps({**chat, "prompt": "p"}), 1)["prompt"] == "p"
    assert parse_line(json.dumps({**chat, "completion": "mine"}), 1)["completion"] == "mine"
    only_user = parse_line('{"messages": [{"role": "user", "content": "hi"}]}', 1)
    assert only_user["prompt"] == [{"role": "user", "content": "hi"}] and "completion" not in only_user
    for bad in ('{"messages": "hi"}', '{"messages": []}'):
        with pytest.raises(DatasetError, match="missing 'prompt'.*'messages' must be a non-empty list"):
            parse_line(bad, 1)
    with pytest.raises(DatasetError, match=r"'messages'\[0\] must be a message"):
        parse_line('{"messages": [{"role": "user"}]}', 1)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # the prompt is the messages before a final assistant one: a lone assistant message leaves none
        (
            '{"messages": [{"role": "assistant", "content": "x"}]}',
            "line 5: 'messages' holds only an assistant",
        ),
        ('{"prompt": [{"role": "bogus", "content": "x"}]}', "line 5: 'prompt'[0] has the role 'bogus'"),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "Assistant", "content": "y"}]}',
            "line 5: 'messages'[1] has the role 'Assistant'",
        ),
        ('{"prompt": []}', "line 5: 'prompt' must be a non-empty string"),
    ],
)
def test_a_chat_row_without_a_prompt_or_with_an_unknown_role_is_refused(text, says):
    with pytest.raises(DatasetError) as caught:
        parse_line(text, 5)
    assert str(caught.value).startswith(says), str(caught.value)


CHAT = {
    "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "4"},
    ]
}


@pytest.mark.parametrize(
    "prompt",
    [
        "p",  # the plain prompt would have been trained on, the chat never seen
        [{"role": "user", "content": "2+2?"}],  # the chat's system message dropped
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"}],
        # the prompt the messages would give, final assistant message and all: not what they give
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ],
)
def test_a_row_with_a_prompt_and_messages_that_differ_is_refused_on_upload_naming_the_line(
    prompt, tmp_path, caplog
):
    line = json.dumps({**CHAT, "prompt": prompt})
    with pytest.raises(DatasetError) as caught:
        parse_line(line, 7, uploading=True)
    assert str(caught.value).startswith("line 7: 'prompt' and 'messages' are both given"), str(caught.value)
    # the trainer reads its rows again at a job's start: a dataset uploaded before the rule trains
    # on its 'prompt', as it did then, the worker's log saying so once for the file
    assert parse_line(line, 7)["prompt"] == parse_line(json.dumps({"prompt": prompt}), 7)["prompt"]
    path = rows_file(
        tmp_path / "d.jsonl", [b'{"prompt": "ok"}\n', line.encode() + b"\n", line.encode() + b"\n"]
    )
    with caplog.at_level("WARNING", logger="trainer.data"):
        rows = RowFile(path)
    assert len(rows) == 3 and rows[1]["prompt"] == parse_line(line, 2)["prompt"]
    rows.close()
    warnings = [record.getMessage() for record in caplog.records if record.name == "trainer.data"]
    assert len(warnings) == 1 and "2 row(s) (line 2 first)" in warnings[0], warnings


@pytest.mark.parametrize(
    ("messages", "same"),
    [
        # the common shape: the question as 'prompt', and the chat with its reference answer
        ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], True),
        ([{"role": "user", "content": "What is 2+2?"}], True),  # no final assistant message
        ([{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}], True),  # as parts
        # a system message the string prompt lacks, another question, another role: different
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
            ],
            False,
        ),
        ([{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "6"}], False),
        ([{"role": "system", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], False),
        (
            [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "Sure?"},
            ],
            False,
        ),
    ],
)
def test_a_string_prompt_is_the_same_as_messages_holding_one_user_message_of_it(messages, same):
    line = json.dumps({"prompt": "What is 2+2?", "messages": messages})
    if same:
        row = parse_line(line, 3, uploading=True)
        assert row["prompt"] == "What is 2+2?" and row["messages"] == messages
    else:
        with pytest.raises(DatasetError, match=r"^line 3: 'prompt' and 'messages' are both given"):
            parse_line(line, 3, uploading=True)


def test_a_prompt_its_messages_give_or_a_null_messages_is_no_conflict(tmp_path):
    """A chat row as read once (chat_row: what POST /v1/files stores) reads back as it is."""
    stored = json.dumps(chat_row(CHAT))
    assert json.loads(stored)["messages"] == CHAT["messages"] and "prompt" in json.loads(stored)
    row = parse_line(stored, 1, uploading=True)
    assert row["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert row["completion"] == "4"
    rows = RowFile(rows_file(tmp_path / "d.jsonl", [stored.encode() + b"\n"]))
    assert rows[0]["prompt"] == row["prompt"]
    rows.close()
    assert parse_line('{"prompt": "p", "messages": null}', 1, uploading=True)["prompt"] == "p"


def test_a_prompt_of_messages_takes_the_roles_chat_templates_know():
    roles = ["developer", "system", "user", "assistant", "tool", "user"]
    row = parse_line(json.dumps({"prompt": [{"role": role, "content": "x"} for role in roles]}), 1)
    assert [message["role"] for message in row["prompt"]] == ["system", *roles[1:]]  # developer: system


def rows_file(path, lines: list[bytes]):
    path.write_bytes(b"".join(lines))
    return path


def test_a_row_file_reads_each_row_from_disk_when_asked(tmp_path):
    path = rows_file(
        tmp_path / "d.jsonl",
        [
            b'{"prompt": "a", "answer": "1"}\n',
            b"\n",
            b"  \r\n",
            '{"prompt": "\u00e9\u4e2d", "answer": "2"}\r\n'.encode(),
            b'{"prompt": [{"role": "user", "content": "c"}], "answer": "3"}',
        ],
    )
    rows = RowFile(path, required=["answer"])
    assert len(rows) == 3
    assert [row["answer"] for row in rows] == ["1", "2", "3"] == [rows[i]["answer"] for i in range(3)]
    assert rows[1]["prompt"] == "\u00e9\u4e2d" and rows[-1]["prompt"][0]["content"] == "c"
    assert list(rows) == parse_rows(path.read_text(encoding="utf-8").splitlines())
    # The rows are not kept: a row rewritten in place (same length) is read as it now is.
    path.write_bytes(path.read_bytes().replace(b'"answer": "1"', b'"answer": "9"'))
    assert rows[0]["answer"] == "9"
    rows.close()


@pytest.mark.parametrize(
    ("lines", "required", "says"),
    [
        (
            [b'{"prompt": "a", "x": 1}\n', b"\n", b'{"prompt": "b"}\n'],
            ["x"],
            "line 3: the rewards need the field 'x'",
        ),
        ([b'{"prompt": "a"}\n', b"\xff\xfe\n"], [], "line 2: not UTF-8 text"),
        ([b'{"prompt": "a"}\n', b"[" * 5000 + b"\n"], [], "line 2: not valid JSON"),
        ([b"\n", b"  \n"], [], "the dataset has no rows"),
    ],
)
def test_a_row_file_names_the_bad_line(tmp_path, lines, required, says):
    with pytest.raises(DatasetError, match=says):
        RowFile(rows_file(tmp_path / "d.jsonl", lines), required=required)


def test_a_missing_row_file_says_so(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        RowFile(tmp_path / "nope.jsonl")


def test_prompt_sampler_visits_every_row_each_epoch_and_resumes():
    sampler = PromptSampler(5, seed=3)
    first_epoch = sampler.draw(5)
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]
    sampler.draw(2)
    copy = PromptSampler(5, seed=3)
    copy.load_state_dict(sampler.state_dict())
    assert copy.draw(7) == sampler.draw(7)


@pytest.mark.parametrize(
    ("values", "param", "hint"),
    [
        ({"group_size": 1}, "hyperparameters.group_size", "must be >= 2"),
        ({"loss_type": "ppo"}, "hyperparameters.loss_type", "expected one of grpo, bnpo, dr_grpo, dapo"),
        ({"scale_rewards": "yes"}, "hyperparameters.scale_rewards", "expected one of group, batch, none"),
        (
            {"importance_sampling_level": "doc"},
            "hyperparameters.importance_sampling_level",
            "token, sequence",
        ),
        ({"top_p": 1.5}, "hyperparameters.top_p", "must be in (0, 1]"),
        ({"learning_rate": "fast"}, "hyperparameters.learning_rate", "must be a number"),
        ({"lr": 1e-5}, "hyperparameters.lr", "unknown hyperparameter 'lr'"),
        ({"lora": {"r": 0}}, "hyperparameters.lora.r", "must be >= 1"),
        ({"lora": {"rank": 8}}, "hyperparameters.lora.rank", "unknown LoRA option"),
        ({"delta": 0.5}, "hyperparameters.delta", "must be >= 1"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(values, param, hint):
    with pytest.raises(ConfigError) as caught:
        GRPOConfig.from_dict(values)
    assert caught.value.param == param
    assert hint in str(caught.value)


@pytest.mark.parametrize(
    ("values", "param", "hint"),
    [
        ({"learning_rte": 1e-5}, "hyperparameters.learning_rte", "did you mean 'learning_rate'? known ones:"),
        (
            {"num_generations": 8},
            "hyperparameters.num_generations",
            "did you mean 'group_size'?",
        ),  # TRL's name
        ({"Max_Steps": 8}, "hyperparameters.Max_Steps", "did you mean 'max_steps'?"),
        ({"lora": {"rank": 8}}, "hyperparameters.lora.rank", "did you mean 'r'?"),
        ({"lora": {"alpah": 8}}, "hyperparameters.lora.alpah", "did you mean 'alpha'?"),
        ({"loss_type": "dr-grpo"}, "hyperparameters.loss_type", "did you mean 'dr_grpo'?"),
    ],
)
def test_an_unknown_name_suggests_the_nearest_known_one(values, param, hint):
    with pytest.raises(ConfigError) as caught:
        GRPOConfig.from_dict(values)
    assert caught.value.param == param and hint in caught.value.message, caught.value.message
    with pytest.raises(ConfigError) as caught:
        GRPOConfig.from_dict({"zzzz": 1})
    assert "did you mean" not in caught.value.message  # nothing near: no guess


def test_an_unknown_reward_type_or_option_suggests_the_nearest_known_one():
    from trainer.rewards import validate_reward_specs

    for spec, param, hint in (
        ({"type": "exact_macth"}, "reward[0].type", "did you mean 'exact_match'?"),
        ({"type": "exact_match", "extrct": "last_number"}, "reward[0].extrct", "did you mean 'extract'?"),
        (
            {"type": "exact_match", "extract": "last_numbr"},
            "reward[0].extract",
            "did you mean 'last_number'?",
        ),
    ):
        with pytest.raises(ConfigError) as caught:
            validate_reward_specs([spec])
        assert caught.value.param == param and hint in caught.value.message, caught.value.message


def test_run_config_from_spec_takes_top_level_group_size():
    run = RunConfig.from_spec(
        {
            "base_model": "m",
            "dataset": "d.jsonl",
            "group_size": 4,
            "reward": {"type": "exact_match"},
            "hyperparameters": {"lora": {"r": 8}},
        }
    )
    assert run.hyperparameters.group_size == 4 and run.hyperparameters.lora.r == 8
    assert run.reward == [{"type": "exact_match"}]
    with pytest.raises(ConfigError, match="base_model: is required"):
        RunConfig.from_spec({"dataset": "d", "reward": []})


def test_a_specs_group_size_is_read_in_one_place_and_errors_name_where_it_was_written():
    """A top-level group_size stands in for the hyperparameters' (null: absent, as the HTTP API
    stores it), and its error names ``group_size``; one in the hyperparameters names theirs."""
    inside = {"hyperparameters": {"group_size": 3}}
    assert spec_hyperparameters({**inside, "group_size": None}).group_size == 3
    assert spec_hyperparameters({**inside, "group_size": 3}).group_size == 3
    assert spec_hyperparameters({"group_size": 5, "hyperparameters": {"max_steps": 2}}).group_size == 5
    assert spec_hyperparameters({}).group_size == GRPOConfig().group_size
    with pytest.raises(ConfigError) as top_level:
        spec_hyperparameters({**inside, "group_size": 1})
    assert top_level.value.param == "group_size" and ">= 2" in top_level.value.message
    with pytest.raises(ConfigError) as nested:
        spec_hyperparameters({"hyperparameters": {"group_size": 1}})
    assert nested.value.param == "hyperparameters.group_size"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (float("nan"), "must be an integer, got nan"),
        (float("-inf"), "must be an integer, got -inf"),
        ([], "must be an integer, got []"),
        ({}, "must be an integer, got {}"),
        ("1", "must be an integer, got '1'"),
        (True, "must be an integer, got True"),
        (-1, "must be >= 2, got -1"),
        (None, "must be an integer, got None"),
    ],
)
def test_a_bad_group_size_in_the_hyperparameters_is_refused_beside_a_top_level_one(value, says):
    """Once silently replaced by the top-level group_size."""
    with pytest.raises(ConfigError) as caught:
        spec_hyperparameters({"group_size": 4, "hyperparameters": {"group_size": value}})
    assert caught.value.param == "hyperparameters.group_size" and caught.value.message == says


def test_a_temperature_below_what_vllm_samples_at_is_refused_with_vllm():
    """vLLM samples any temperature under 0.01 at 0.01: the log-probs would be at another one.
    Our own sampler takes it (a job stored with one still runs)."""
    with pytest.raises(ConfigError) as caught:
        spec_hyperparameters({"hyperparameters": {"temperature": 0.005, "generation": "vllm"}})
    assert caught.value.param == "hyperparameters.temperature" and "0.01" in caught.value.message
    assert (
        spec_hyperparameters({"hyperparameters": {"temperature": 0.01, "generation": "vllm"}}).temperature
        == 0.01
    )
    assert spec_hyperparameters({"hyperparameters": {"temperature": 0.005}}).temperature == 0.005


def test_two_group_sizes_that_differ_are_refused_naming_both():
    with pytest.raises(ConfigError) as caught:
        spec_hyperparameters({"group_size": 4, "hyperparameters": {"group_size": 8}})
    assert caught.value.param == "hyperparameters.group_size"
    assert caught.value.message.startswith("is 8, but group_size (at the top level) is 4"), (
        caught.value.message
    )


@pytest.mark.parametrize(
    ("value", "says"), [("2", "must be an integer, got '2'"), (True, "must be an integer, got True")]
)
def test_a_top_level_group_size_is_an_integer_as_the_hyperparameters_are(value, says):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_spec(
            {"base_model": "m", "dataset": "d", "reward": [{"type": "exact_match"}], "group_size": value}
        )
    assert (caught.value.param, caught.value.message) == ("group_size", says)


def test_only_the_cli_reads_the_operators_allowances_from_the_environment():
    assert (
        policy_from_environ({})
        == OperatorPolicy()
        == RunConfig.from_spec(
            {"base_model": "m", "dataset": "d.jsonl", "reward": [{"type": "exact_match"}]}
        ).policy
    )
    environ = {
        "GRPO_ALLOW_PRIVATE_HOSTS": " 127.0.0.1, scorer.internal ,",
        "GRPO_SANDBOX_ALLOW_UNISOLATED": "1",
        "GRPO_SANDBOX_ALLOW_NETWORK": "true",
    }
    assert policy_from_environ(environ) == OperatorPolicy(
        allow_private_hosts=("127.0.0.1", "scorer.internal"),
        sandbox_allow_unisolated=True,
        sandbox_allow_network=True,
    )
