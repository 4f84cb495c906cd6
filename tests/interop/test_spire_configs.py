"""SPIRE cannot be installed on the CI machines, so the files that run it
are checked statically: the configs parse as HCL and say what the README and
scripts/spire-quickstart.sh rely on. (The script itself goes through
shellcheck in scripts/test.)"""

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
    assert server["socket_path"].strip('"') == "/tmp/spiffe-tunnel-spire/server/api.sock"
    assert plugin_names(conf, "NodeAttestor") == {"join_token"}
    assert plugin_names(conf, "DataStore") == {"sql"}
    assert "sqlite3" in str(block(conf, "plugins")["DataStore"])


def test_agent_conf_parses_and_serves_the_default_socket():
    conf = load("agent.conf")
    agent = block(conf, "agent")
    assert agent["trust_domain"].strip('"') == "example.org"
    assert agent["socket_path"].strip('"') == "/tmp/spire-agent/public/api.sock"
    assert plugin_names(conf, "NodeAttestor") == {"join_token"}
    assert plugin_names(conf, "WorkloadAttestor") == {"unix"}
    for example in ("inbound.toml", "outbound.toml"):
        text = (REPO / "examples" / "spire" / example).read_text()
        assert 'socket = "unix:///tmp/spire-agent/public/api.sock"' in text
