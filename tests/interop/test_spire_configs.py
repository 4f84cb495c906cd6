"""The shipped SPIRE configs parse as HCL and say what docs/spire.md and
scripts/spire-quickstart.sh rely on. They also run for real against SPIRE
v1.13.3 in tests/spire_quickstart.rs (the script end to end, and an agent
and a server restart); this is the fast static check, with shellcheck on the
script in scripts/test."""

from pathlib import Path

import hcl2

REPO = Path(__file__).resolve().parents[2]


def load(name):
    with open(REPO / "spire-config" / name) as f:
        return hcl2.load(f)


def block(parsed, name):
    (value,) = parsed[name]
    return value


def plugin_names(parsed, kind):
    plugins = block(parsed, "plugins")
    return {name.strip('"') for entry in plugins[kind] for name in entry if not name.startswith("__")}


def test_server_conf_parses_and_has_what_the_quickstart_needs():
    conf = load("server.conf")
    server = block(conf, "server")
    assert server["trust_domain"].strip('"') == "example.org"
    assert server["socket_path"].strip('"') == "/tmp/spire-server/private/api.sock"
    assert plugin_names(conf, "NodeAttestor") == {"join_token"}
    # A restarted server keeps its CA.
    assert plugin_names(conf, "KeyManager") == {"disk"}
    assert plugin_names(conf, "DataStore") == {"sql"}
    assert "sqlite3" in str(block(conf, "plugins")["DataStore"])


def test_agent_conf_parses_and_serves_the_default_socket():
    conf = load("agent.conf")
    agent = block(conf, "agent")
    assert agent["trust_domain"].strip('"') == "example.org"
    assert agent["socket_path"].strip('"') == "/tmp/spire-agent/public/api.sock"
    assert plugin_names(conf, "NodeAttestor") == {"join_token"}
    assert plugin_names(conf, "WorkloadAttestor") == {"unix"}
    # A restarted agent keeps its node identity: with "memory" it would have
    # to attest again, and its join token is spent.
    assert plugin_names(conf, "KeyManager") == {"disk"}
    for example in ("inbound.toml", "outbound.toml"):
        text = (REPO / "examples" / "spire" / example).read_text()
        assert 'socket = "unix:///tmp/spire-agent/public/api.sock"' in text
