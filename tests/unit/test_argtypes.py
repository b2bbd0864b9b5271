"""The shared argparse checks: bad flags fail with one clear line in every subcommand."""

import argparse

import pytest

from llmserve.argtypes import non_negative_int, positive_float, positive_int, tcp_port


@pytest.mark.parametrize(("check", "text", "value"), [
    (positive_int, "3", 3),
    (non_negative_int, "0", 0),
    (tcp_port, "65535", 65535),
    (positive_float, "2.5", 2.5),
])
def test_accepts(check, text, value):
    assert check(text) == value


@pytest.mark.parametrize(("check", "text", "message"), [
    (positive_int, "0", "must be at least 1, got 0"),
    (positive_int, "1.5", "expected a whole number, got '1.5'"),
    (non_negative_int, "-1", "must be at least 0, got -1"),
    (tcp_port, "65536", "65536 is not a TCP port"),
    (tcp_port, "0", "must be at least 1"),
    (positive_float, "0", "must be positive, got 0"),
    (positive_float, "fast", "expected a number, got 'fast'"),
])
def test_rejects_with_a_clear_message(check, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace(".", r"\.")):
        check(text)


@pytest.mark.parametrize("argv", [
    ["testbed", "up", "--nodes", "0"],
    ["verify", "/repo", "m", "0"],
    ["predictor", "--triton-grpc", "localhost:8001", "--model", "m", "--http-port", "70000"],
])
def test_each_cli_refuses_bad_numbers_before_running(argv, capsys):
    from llmserve.cli import build_parser
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2 and "Traceback" not in capsys.readouterr().err
