"""The command line: every flag has an environment variable; flags win."""

from __future__ import annotations

import asyncio

import pytest

from gateway.__main__ import _loop_factory, build_parser, config_from_args


def parse(argv, monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults(monkeypatch):
    config = parse([], monkeypatch)
    assert (config.host, config.port, config.api_keys) == ("127.0.0.1", 8787, ())
    assert config.engine.model == "stabilityai/sd-x2-latent-upscaler"


def test_environment_and_flags(monkeypatch):
    config = parse(
        ["--port", "9000", "--model-alias", "my-upscaler"],
        monkeypatch,
        LATENT_UPSCALER_API_KEYS="a, b",
        LATENT_UPSCALER_PORT="9100",
        LATENT_UPSCALER_MODEL="tiny",
        LATENT_UPSCALER_ALLOW_PRIVATE_NETWORKS="true",
        LATENT_UPSCALER_MAX_STEPS="50",
    )
    assert config.api_keys == ("a", "b")
    assert config.port == 9000  # the flag wins
    assert config.engine.model == "tiny" and config.allow_private_networks
    assert config.max_steps == config.engine.max_steps == 50
    assert "my-upscaler" in config.accepted_models and "runware:502@1" in config.accepted_models


def test_help_names_every_variable(capsys):
    parser = build_parser()
    for command in ("serve", "gateway", "worker"):
        sub = parser._subparsers._group_actions[0].choices[command]
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "LATENT_UPSCALER_" in (action.help or ""), (command, action.dest)
        assert "LATENT_UPSCALER_" in text


def test_cluster_roles_take_the_flags_of_their_part(monkeypatch):
    from gateway.__main__ import cluster_from_args

    monkeypatch.setenv("LATENT_UPSCALER_REDIS_URL", "redis://127.0.0.1:7000/2")
    args = build_parser().parse_args(["worker", "--model", "tiny", "--max-batch-rows", "8", "--worker-id", "w7"])
    config, cluster = config_from_args(args), cluster_from_args(args)
    assert (config.engine.model, config.engine.max_batch_rows) == ("tiny", 8)
    assert (cluster.redis_url, cluster.member_id, cluster.claim_timeout, cluster.max_deliveries) == (
        "redis://127.0.0.1:7000/2",
        "w7",
        15.0,
        3,
    )
    args = build_parser().parse_args(["gateway", "--port", "9001", "--max-queued", "5", "--claim-timeout", "4"])
    config, cluster = config_from_args(args), cluster_from_args(args)
    assert config.port == 9001 and (cluster.max_queued, cluster.claim_timeout) == (5, 4.0)
    assert cluster.member_id.startswith("gateway-")
    with pytest.raises(ValueError, match="--claim-timeout"):
        cluster_from_args(build_parser().parse_args(["gateway", "--claim-timeout", "0"]))


def test_a_simulated_model_must_be_spelled_out():
    from engine.sim import parse_sim

    assert parse_sim("sim:40,2.5") == (40.0, 2.5)
    for bad in ("sim:", "sim:40", "sim:a,b", "sim:-1,2"):
        with pytest.raises(ValueError, match="sim:"):
            parse_sim(bad)


def test_engine_scheduling_flags(monkeypatch):
    config = parse(["--torch-threads", "3"], monkeypatch, LATENT_UPSCALER_GROUP_POLICY="round-robin")
    assert config.engine.group_policy == "round-robin" and config.engine.torch_threads == 3
    monkeypatch.delenv("LATENT_UPSCALER_GROUP_POLICY")
    defaults = parse([], monkeypatch).engine
    assert defaults.group_policy == "deadline" and defaults.vae_overlap == "auto"
    assert defaults.overlaps_vae("cpu") and not defaults.overlaps_vae("cuda")
    forced = parse([], monkeypatch, LATENT_UPSCALER_VAE_OVERLAP="on").engine
    assert forced.overlaps_vae("cuda")
    assert not parse(["--vae-overlap", "off"], monkeypatch).engine.overlaps_vae("cpu")


def test_bad_engine_scheduling_values_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="LATENT_UPSCALER_GROUP_POLICY"):
        parse([], monkeypatch, LATENT_UPSCALER_GROUP_POLICY="fastest")
    monkeypatch.delenv("LATENT_UPSCALER_GROUP_POLICY")
    with pytest.raises(ValueError, match="at least 1"):
        parse(["--torch-threads", "0"], monkeypatch)
    with pytest.raises(ValueError, match="LATENT_UPSCALER_VAE_OVERLAP"):
        parse([], monkeypatch, LATENT_UPSCALER_VAE_OVERLAP="sometimes")


def test_rest_flags(monkeypatch):
    import pytest

    defaults = parse([], monkeypatch)
    assert (defaults.http_port, defaults.rest_timeout, defaults.cors_origins) == (8788, 300.0, ())
    assert parse(["--http-port", "off"], monkeypatch).http_port is None
    config = parse(
        ["--cors-origin", "https://a.example", "--cors-origin", "*", "--rest-timeout", "30"],
        monkeypatch,
        LATENT_UPSCALER_HTTP_PORT="9001",
    )
    assert config.http_port == 9001 and config.rest_timeout == 30.0
    assert config.cors_origins == ("https://a.example", "*")
    from_env = parse([], monkeypatch, LATENT_UPSCALER_CORS_ORIGIN="https://b.example, https://c.example")
    assert from_env.cors_origins == ("https://b.example", "https://c.example")
    monkeypatch.setenv("LATENT_UPSCALER_HTTP_PORT", "off")
    assert parse([], monkeypatch).http_port is None
    with pytest.raises(ValueError, match="must differ from --port"):
        parse(["--http-port", "8787"], monkeypatch)


def test_the_event_loop_is_uvloop_unless_asked_otherwise(monkeypatch):
    def loop_of(argv, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        choice = build_parser().parse_args([*argv]).event_loop
        with asyncio.Runner(loop_factory=_loop_factory(choice)) as runner:
            return type(runner.get_loop()).__module__

    assert loop_of(["serve"]).startswith("uvloop")
    assert loop_of(["worker", "--redis-url", "redis://x", "--event-loop", "uvloop"]).startswith("uvloop")
    assert loop_of(["gateway", "--redis-url", "redis://x"], LATENT_UPSCALER_EVENT_LOOP="asyncio") == (
        "asyncio.unix_events"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--event-loop", "trio"])
