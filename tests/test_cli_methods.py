"""`fedlora methods` and `fedlora methods NAME` on an 80-column console: nothing wider, no name or formula broken,
types in words, defaults as written in a config, descriptions without pointers to repository documents."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fedlora import method_help, methods
from fedlora.cli import app

runner = CliRunner()


@pytest.fixture
def narrow(monkeypatch):
    from fedlora import cli

    monkeypatch.setattr(cli.console, "width", 80)


def invoke(*args: str) -> list[str]:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    return lines


def block(lines: list[str], start: str, indent: int) -> str:
    """The text that begins on the line starting with ``start`` and continues on lines indented by ``indent``
    spaces, rejoined with single spaces."""
    i = lines.index(next(line for line in lines if line.startswith(start)))
    parts = [lines[i][len(start) :].strip()]
    for line in lines[i + 1 :]:
        if not line.startswith(" " * indent) or not line.strip():
            break
        parts.append(line.strip())
    return " ".join(parts)


def test_methods_table_fits_80_columns_with_every_name_and_formula_whole(narrow):
    lines = invoke("methods")
    table = lines[: lines.index("Communication: scalars sent per adapted d×k matrix, per client, per round.")]
    rows = {
        line.split()[0]: line.split()[1:] for line in table if line.split() and line.split()[0] in methods.available()
    }
    assert set(rows) == set(methods.available())
    assert rows["flora"][:6] == ["yes", "native", "yes", "no", "no", "lora,"]
    assert rows["fedsa_lora"][:5] == ["no", "no", "no", "yes", "yes"]
    for key in methods.available():
        c = methods.capabilities(key)
        own = lines[lines.index(next(line for line in lines if line.startswith(f"{key}: "))) :]
        # rejoined with single spaces, each text is the original: no word or formula was cut across lines
        assert block(own, f"{key}: ", 4) == c.paper
        assert block(own, "  up:", 8) == c.uplink
        assert block(own, "  down:", 8) == c.downlink
    assert "  down: min((Σ_u r_u)(d+k), d·k) base edit; the adapter restarts from a fresh" in lines


def test_one_method_shows_its_description_types_in_words_and_defaults(narrow):
    lines = invoke("methods", "flora_na")
    text = "\n".join(lines)
    assert lines[0].startswith("FLoRA-NA (Nguyen et al.")
    assert "    (p, q) = argmin ‖(Σ_u p_u B̃_u)(Σ_v q_v A_v) − M‖_F,   M = Σ_u t_u B̃_u A_u," in lines
    rows = {line.split()[0]: line.split(None, 1)[1].rstrip() for line in lines if line.startswith(" method.")}
    assert rows == {
        "method.solver": "newton | als | adam     newton",
        "method.target": "weighted_mean | sum     weighted_mean",
        "method.shared_coefficients": "bool                    false",
        "method.gauge": "fedit_ratio | balanced  fedit_ratio",
        "method.route": "auto | gram | factor    auto",
        "method.max_iter": "int                     100",
        "method.tol": "float                   1e-12",
        "method.ridge": "float                   0.0",
        "method.adam_steps": "int                     500",
        "method.restarts": "int                     16",
        "method.seed": "int                     0",
    }
    assert "Literal" not in text and ".md" not in text and "fedlora's reading" not in text


def test_a_method_without_keys_and_one_with_a_list_type(narrow):
    assert invoke("methods", "fedit")[-1] == "fedit has no method.* keys."
    rows = [line.split()[:2] for line in invoke("methods", "fslora") if line.startswith(" method.")]
    assert rows[0] == ["method.sketch_ratio", "float"]
    assert method_help.parameters(methods.params_class("fslora"))[0] == (
        "method.sketch_ratio",
        "float or list of float",
        "0.5",
    )


@pytest.mark.parametrize("key", methods.available())
def test_every_description_names_its_paper_and_points_to_no_repository_file(key):
    text = method_help.description(key, methods.params_class(key))
    (paper_id,) = re.findall(r"arXiv \d{4}\.\d{4,5}|OpenReview \w+", methods.capabilities(key).paper)
    assert paper_id in text.split("\n\n")[0]
    assert ".md" not in text and "§" not in text and "()" not in text
    assert all(len(line) <= 80 for line in method_help.wrap(text, 80))


def test_shared_modules_add_the_paragraph_of_their_own_method():
    own = " ".join(method_help.description("pfedloru", methods.params_class("pfedloru")).split("\n\n")[-1].split())
    assert own.startswith("pFedLoRU (statistical heterogeneity; fedlora's reading): every client")
    assert "mFedLoRU (model" not in method_help.description("pfedloru", methods.params_class("pfedloru"))


def test_wrap_keeps_formulas_and_short_bracket_groups_whole():
    prose = "Prose with an inline Σ_{u: r_u > i} w_u term that must stay whole here."
    text = prose + "\n\n    A = Σ_u w_u A_u,   B = Σ_u w_u B_u"
    assert method_help.wrap(text, 30) == [
        "Prose with an inline",
        "Σ_{u: r_u > i} w_u term that",
        "must stay whole here.",
        "",
        "    A = Σ_u w_u A_u,",
        "    B = Σ_u w_u B_u",
    ]
    assert method_help.outside_brackets("min((Σ_u r_u)(d+k), d·k) base edit") == [
        "min((Σ_u r_u)(d+k), d·k)",
        "base",
        "edit",
    ]


def test_an_unknown_method_is_one_line_with_the_name_as_typed(monkeypatch):
    from fedlora import cli

    monkeypatch.setattr(cli.console, "width", 300)
    res = runner.invoke(app, ["methods", "fed[x]it"])
    assert res.exit_code == 2
    assert res.output.startswith("error: unknown method 'fed[x]it': valid methods are fedit, flora_na,")
    assert res.output.rstrip().endswith("did you mean 'fedit'?") and res.output.count("\n") == 1


def test_methods_say_which_work_under_secure_aggregation_and_central_dp_and_why_not(narrow):
    lines = invoke("methods")
    start = lines.index("Secure aggregation and central DP need an uplink the server only sums:")
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("Why not:"):
            break
        if line.split() and line.split()[0] in methods.available():
            key, secure, central = line.split(None, 2)
            rows[key] = (secure, central.strip())
    assert set(rows) == set(methods.available())
    assert rows["fedit"] == ("yes", "yes, with equal ranks")
    assert rows["fedloru"] == ("yes", 'yes, with equal ranks and method.reset = "server"')
    assert rows["ffa_lora"] == ("yes", "yes") and rows["flora_na"] == ("no", "no")
    why = lines[lines.index("Why not:") + 1 :]
    for key in methods.available():
        c = methods.capabilities(key)
        assert rows[key][0] == ("yes" if c.secure_aggregation else "no")
        if not c.secure_aggregation:
            assert block(why, f"  {key}: ", 4) == c.not_a_sum
    assert "  flora_na: it solves its coefficients from each client's factors" in why
