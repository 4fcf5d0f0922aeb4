"""Scheme W3: a QR code in a keyed window of one layer's channel connectivity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import error_line, invoke

from ticketguard.errors import ConfigError, EmbeddingError
from ticketguard.signatures.keys import generate_key
from ticketguard.signatures.signing import SignConfig, sign_without_data
from ticketguard.signatures.topology import channel_connectivity
from ticketguard.signatures.w3 import (
    W3Params,
    choose_layer,
    crop_window,
    decode_window,
    make_symbol,
    plan_qr,
    read_qr,
    window_positions,
    write_qr,
)
from ticketguard.tickets.mask import Mask
from ticketguard.verify.verification import verify

TEXT = "alice@example.org 2026-1"  # 24 bytes: the most a version-3 code holds at level H


def _ticket(make_ticket, seed: int = 0):
    ticket = make_ticket(width=32, keep=0.3, seed=seed)
    ticket.metadata.update(
        {"dataset": {"name": "digits", "split_seed": 0}, "input_shape": [1, 8, 8]}
    )
    return ticket


# --- the symbol ----------------------------------------------------------------------------------


def test_symbol_version_fits_the_text_at_level_h() -> None:
    symbol = make_symbol(TEXT)
    assert (symbol.version, symbol.size) == (3, 29)
    assert symbol.dark.shape == symbol.function.shape == (29, 29)
    # Three 8x8 finder corners (with separators) are function modules, the centre is data.
    assert symbol.function[:8, :8].all() and symbol.function[:8, -8:].all()
    assert symbol.function[-8:, :8].all() and not symbol.function[14, 14]
    assert make_symbol(TEXT + "x").version == 4
    assert decode_window(~symbol.dark) == TEXT


@pytest.mark.parametrize(("text", "message"), [("", "non-empty"), ("x" * 1274, "at most 1273")])
def test_symbol_refuses_texts_that_do_not_fit(text: str, message: str) -> None:
    with pytest.raises(EmbeddingError, match=message):
        make_symbol(text)


# --- placement and writing -----------------------------------------------------------------------


def test_placement_is_keyed_and_inside_the_layer(make_ticket) -> None:
    mask = _ticket(make_ticket).mask
    symbol = make_symbol(TEXT)
    a = plan_qr(mask, "fc1.weight", symbol, b"\x01" * 32)
    assert a == plan_qr(mask, "fc1.weight", symbol, b"\x01" * 32)
    others = {(plan_qr(mask, "fc1.weight", symbol, bytes([i]) * 32).row) for i in range(2, 12)}
    assert len(others) > 3
    out, inp = mask["fc1.weight"].shape
    assert 0 <= a.row <= out - 29 and 0 <= a.col <= inp - 29
    expected = [(a.row + i) * inp + a.col + j for i in range(29) for j in range(29)]
    assert window_positions(a).tolist() == expected


def test_write_qr_keeps_counts_and_draws_the_code(make_ticket) -> None:
    ticket = _ticket(make_ticket)
    before = {n: m.clone() for n, m in ticket.mask.items()}
    params = plan_qr(ticket.mask, "conv3.weight", make_symbol(TEXT), b"\x02" * 32)
    mask = write_qr(ticket.mask, ticket.trained, ticket.rewind, params).mask
    assert all(torch.equal(ticket.mask[n], before[n]) for n in before)  # pure
    for name in mask:
        assert int(mask[name].sum()) == int(before[name].sum()), name
    window = crop_window(mask, params)
    assert np.array_equal(window, ~params.symbol.dark)
    # Outside the window only the count restoration touched the layer; other layers unchanged.
    assert torch.equal(mask["fc1.weight"], before["fc1.weight"])
    reading = read_qr(mask, params)
    assert reading.mismatches == 0 and reading.decoded == TEXT


def test_light_modules_are_strong_carriers_after_signing(make_ticket) -> None:
    """Every connected (light) module has a carrier that signing holds at the layer's 0.9
    quantile, so magnitude pruning reaches the code last."""
    ticket = _ticket(make_ticket)
    params = plan_qr(ticket.mask, "conv3.weight", make_symbol(TEXT), b"\x02" * 32)
    written = write_qr(ticket.mask, ticket.trained, ticket.rewind, params)
    light = ~params.symbol.dark.reshape(-1)
    carriers = written.carriers["conv3.weight"]
    kernel = ticket.mask["conv3.weight"][0, 0].numel()
    assert sorted((carriers // kernel).tolist()) == sorted(window_positions(params)[light].tolist())
    config = SignConfig(scheme="W3", qr_text=TEXT, qr_layer="conv3.weight")
    result = sign_without_data(ticket, generate_key("alice@example.org"), config)
    level = torch.quantile(
        ticket.trained["conv3.weight"][ticket.mask["conv3.weight"]].abs().float(), 0.9
    )
    signed = result.ticket.trained["conv3.weight"].reshape(-1)
    window = window_positions(result.params)
    rows = torch.as_tensor(window[light]) * kernel
    strongest = signed.abs().view(-1, kernel)[rows // kernel].amax(dim=1)
    assert (strongest >= level * (1 - 1e-6)).all()
    assert result.credential["embedding"]["carriers"]["count"] == int(light.sum())


def test_an_unsigned_mask_reads_at_chance(make_ticket) -> None:
    ticket = _ticket(make_ticket)
    params = plan_qr(ticket.mask, "fc1.weight", make_symbol(TEXT), b"\x03" * 32)
    reading = read_qr(ticket.mask, params)
    assert reading.decoded is None
    agree = 1 - reading.mismatches / reading.modules
    assert abs(agree - reading.chance) < 0.1
    conn = channel_connectivity(ticket.mask["fc1.weight"])
    assert reading.density == pytest.approx(float(conn.float().mean()))


def test_layer_choice_and_capacity_errors(make_ticket) -> None:
    mask = _ticket(make_ticket).mask
    symbol = make_symbol(TEXT)
    # conv2 (64x32 channels) is too narrow to absorb 841 connections; fc1 has the most room.
    assert choose_layer(mask, ["conv2.weight", "conv3.weight", "fc1.weight"], 29) == "fc1.weight"
    assert choose_layer(mask, ["conv2.weight", "conv3.weight"], 29) == "conv3.weight"
    tiny = Mask({"a.weight": torch.ones(10, 40, dtype=torch.bool)})
    with pytest.raises(EmbeddingError, match="no layer can hold a 29x29 QR code"):
        choose_layer(tiny, ["a.weight"], 29)
    with pytest.raises(EmbeddingError, match="cannot hold a 29x29 QR code"):
        plan_qr(tiny, "a.weight", symbol, b"\x01" * 32)
    full = Mask({"a.weight": torch.ones(64, 64, dtype=torch.bool)})
    with pytest.raises(EmbeddingError, match="can absorb 0 written connections"):
        plan_qr(full, "a.weight", symbol, b"\x01" * 32)


# --- the credential's parameters -----------------------------------------------------------------


def test_params_round_trip_through_json(make_ticket) -> None:
    params = plan_qr(_ticket(make_ticket).mask, "fc1.weight", make_symbol(TEXT), b"\x04" * 32)
    again = W3Params.from_dict(json.loads(json.dumps(params.to_dict())))
    assert (again.row, again.col, again.size, again.layer) == (
        params.row,
        params.col,
        params.size,
        params.layer,
    )
    assert np.array_equal(again.symbol.dark, params.symbol.dark)
    assert np.array_equal(again.symbol.function, params.symbol.function)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("window", "row"), 10_000, "window row inside the layer"),
        (("window", "size"), 25, "window size that is not 29"),
        (("qr", "version"), 41, "QR version"),
        (("qr", "error"), "L", "error level"),
        (("qr", "dark"), "%%%", "not valid base64"),
        (("qr", "dark"), "AAAA", "does not hold 29x29 modules"),
        (("layer", "shape"), [64], "layer shape"),
        (("qr", "mask_pattern"), 8, "mask pattern"),
    ],
)
def test_params_reject_tampered_fields(make_ticket, path, value, message) -> None:
    params = plan_qr(_ticket(make_ticket).mask, "fc1.weight", make_symbol(TEXT), b"\x04" * 32)
    data = json.loads(json.dumps(params.to_dict()))
    data[path[0]][path[1]] = value
    with pytest.raises(EmbeddingError, match=message):
        W3Params.from_dict(data)


# --- signing and verifying -----------------------------------------------------------------------


def test_sign_config_checks_the_qr_options() -> None:
    with pytest.raises(ConfigError, match="needs the text"):
        SignConfig(scheme="W3")
    with pytest.raises(ConfigError, match="belong to the QR scheme"):
        SignConfig(qr_text="x")
    with pytest.raises(ConfigError, match="one of W2, W3"):
        SignConfig(scheme="W4")


def test_signed_without_data_verifies_and_another_ticket_does_not(make_ticket, tmp_path) -> None:
    from ticketguard.signatures.signing import write_signed

    key = generate_key("alice@example.org")
    result = sign_without_data(
        _ticket(make_ticket), key, SignConfig(scheme="W3", qr_text=TEXT), created="2026-01-01"
    )
    assert isinstance(result.params, W3Params)
    assert result.credential["embedding"]["scheme"] == "W3"
    write_signed(result, tmp_path / "qr.ticket")
    report = verify(tmp_path / "qr.ticket", credential=tmp_path / "qr.cred.json", key=key)
    assert report.verified, report.verdict.reason
    (evidence,) = report.evidences
    assert evidence.name == "W3 QR"
    assert evidence.details["mismatches"] == 0 and evidence.details["decodes_expected"]
    assert evidence.log10_p < -100
    _ticket(make_ticket, seed=9).save(tmp_path / "other.ticket")
    other = verify(tmp_path / "other.ticket", credential=tmp_path / "qr.cred.json", key=key)
    assert not other.verified
    assert other.evidences[0].details["decoded"] is None
    assert other.evidences[0].log10_p > -3


def test_cli_sign_qr_and_verify(make_ticket, tmp_path: Path) -> None:
    _ticket(make_ticket).save(tmp_path / "t.ticket")
    assert invoke(["keygen", "--owner", "alice", "--out", tmp_path / "alice"]).exit_code == 0
    base = ["sign", tmp_path / "t.ticket", "--key", tmp_path / "alice.key"]
    result = invoke(
        [*base, "--out", tmp_path / "qr.ticket", "--scheme", "qr", "--qr-text", TEXT]
        + ["--layer", "conv3.weight", "--recover-epochs", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "version-3 QR code (29x29, level H)" in result.output
    assert "into conv3.weight at rows" in result.output
    check = invoke(
        ["verify", tmp_path / "qr.ticket", "--credential", tmp_path / "qr.cred.json"]
        + ["--key", tmp_path / "alice.key", "--json"]
    )
    assert check.exit_code == 0, check.output
    (evidence,) = json.loads(check.output)["evidence"]
    assert evidence["name"] == "W3 QR"
    assert evidence["summary"].endswith(f"a QR reader decodes '{TEXT}'")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scheme", "qr"], "needs the text to encode (--qr-text)"),
        (["--qr-text", "hello"], "belong to the QR scheme"),
        (["--scheme", "qr", "--qr-text", "x", "--layers", "fc1.weight"], "give --layer"),
    ],
)
def test_cli_sign_qr_usage_errors(make_ticket, tmp_path: Path, extra: list, message: str) -> None:
    _ticket(make_ticket).save(tmp_path / "t.ticket")
    assert invoke(["keygen", "--owner", "alice", "--out", tmp_path / "alice"]).exit_code == 0
    result = invoke(
        ["sign", tmp_path / "t.ticket", "--key", tmp_path / "alice.key"]
        + ["--out", tmp_path / "qr.ticket", *extra]
    )
    assert message in error_line(result, 2)
    assert not (tmp_path / "qr.ticket").exists()


def test_cli_sign_qr_into_a_layer_too_small(make_ticket, tmp_path: Path) -> None:
    _ticket(make_ticket).save(tmp_path / "t.ticket")
    assert invoke(["keygen", "--owner", "alice", "--out", tmp_path / "alice"]).exit_code == 0
    result = invoke(
        ["sign", tmp_path / "t.ticket", "--key", tmp_path / "alice.key"]
        + ["--out", tmp_path / "qr.ticket", "--scheme", "qr", "--qr-text", "x" * 200]
        + ["--layer", "conv2.weight", "--recover-epochs", "0"]
    )
    assert "cannot hold a" in error_line(result, 1)
    assert not (tmp_path / "qr.ticket").exists()


# --- claims that must not verify ----------------------------------------------------------------


def _reissued(result, key, embedding: dict, path: Path) -> Path:
    """Issue a validly signed credential like `result`'s, with another embedding field."""
    from ticketguard.signatures.credential import make_credential, write_credential

    document = result.credential
    forged = make_credential(
        key,
        created=document["created"],
        fingerprint_before=document["fingerprint_before"],
        fingerprint_after=document["fingerprint_after"],
        architecture=document["architecture"],
        embedding=embedding,
        seed=result.seed,
    )
    write_credential(path, forged)
    return path


@pytest.fixture
def qr_signed(make_ticket, tmp_path: Path):
    from ticketguard.signatures.signing import write_signed

    key = generate_key("alice@example.org")
    result = sign_without_data(
        _ticket(make_ticket), key, SignConfig(scheme="W3", qr_text=TEXT), created="2026-01-01"
    )
    write_signed(result, tmp_path / "qr.ticket")
    return result, key, tmp_path


def test_a_credential_whose_modules_are_not_its_text_is_refused(qr_signed) -> None:
    result, key, root = qr_signed
    embedding = json.loads(json.dumps(result.credential["embedding"]))
    # Claim the signed window's modules under another text: a pattern that is not its QR code.
    embedding["qr"]["text"] = "mallory owns this"
    path = _reissued(result, key, embedding, root / "forged.cred.json")
    report = verify(root / "qr.ticket", credential=path, key=key)
    assert not report.verified
    assert any("not the QR code of its text" in p for p in report.problems)


def test_a_window_the_seed_does_not_place_is_refused(qr_signed) -> None:
    result, key, root = qr_signed
    embedding = json.loads(json.dumps(result.credential["embedding"]))
    embedding["window"]["row"] = (embedding["window"]["row"] + 1) % 50
    path = _reissued(result, key, embedding, root / "moved.cred.json")
    report = verify(root / "qr.ticket", credential=path, key=key)
    assert not report.verified
    assert any("not where the embedding seed places it" in p for p in report.problems)


@pytest.mark.parametrize("block", ["connected", "unconnected"])
def test_a_structured_innocent_window_stays_at_chance(make_ticket, block: str) -> None:
    """A window much denser or sparser than its layer must not look like the code."""
    from ticketguard.verify.stats import binomial_log10_tail

    ticket = _ticket(make_ticket)
    # A text whose data modules are far from half light makes the bias of a dense block largest.
    params = max(
        (
            plan_qr(ticket.mask, "fc1.weight", make_symbol(f"innocent {i:02d}"), b"\x06" * 32)
            for i in range(20)
        ),
        key=lambda p: abs(0.5 - float((~p.symbol.dark)[~p.symbol.function].mean())),
    )
    mask = dict(ticket.mask)
    fc1 = mask["fc1.weight"].clone()
    window = (slice(params.row, params.row + 29), slice(params.col, params.col + 29))
    fc1[window] = block == "connected"
    mask["fc1.weight"] = fc1
    reading = read_qr(mask, params)
    agree = reading.modules - reading.mismatches
    light = float((~params.symbol.dark)[~params.symbol.function].mean())
    assert reading.chance == pytest.approx(max(light, 1 - light))
    assert agree <= reading.modules * reading.chance + 1e-9
    assert binomial_log10_tail(reading.modules, agree, reading.chance) > -1


def test_zero_data_modules_are_refused(make_ticket) -> None:
    from dataclasses import replace

    params = plan_qr(_ticket(make_ticket).mask, "fc1.weight", make_symbol(TEXT), b"\x07" * 32)
    hollow = replace(params, symbol=replace(params.symbol, function=np.ones((29, 29), bool)))
    with pytest.raises(EmbeddingError, match="no data modules"):
        read_qr(_ticket(make_ticket).mask, hollow)


def test_cli_qr_layer_must_name_one_layer(make_ticket, tmp_path: Path) -> None:
    _ticket(make_ticket).save(tmp_path / "t.ticket")
    assert invoke(["keygen", "--owner", "alice", "--out", tmp_path / "alice"]).exit_code == 0
    base = ["sign", tmp_path / "t.ticket", "--key", tmp_path / "alice.key"]
    result = invoke(
        [*base, "--out", tmp_path / "qr.ticket", "--scheme", "qr", "--qr-text", "x"]
        + ["--layer", "conv*", "--recover-epochs", "0"]
    )
    assert "names 3 layers; the QR code goes into one" in error_line(result, 1)
    result = invoke(
        [*base, "--out", tmp_path / "qr.ticket", "--scheme", "qr", "--qr-text", "x"]
        + ["--ecc-symbols", "32"]
    )
    assert "--ecc-symbols belongs to the W2 scheme" in error_line(result, 2)


def test_cli_qr_with_a_trigger_set_gives_both_evidences(make_ticket, tmp_path: Path) -> None:
    _ticket(make_ticket).save(tmp_path / "t.ticket")
    assert invoke(["keygen", "--owner", "alice", "--out", tmp_path / "alice"]).exit_code == 0
    result = invoke(
        ["sign", tmp_path / "t.ticket", "--key", tmp_path / "alice.key"]
        + ["--out", tmp_path / "qr.ticket", "--scheme", "qr", "--qr-text", TEXT]
        + ["--trigger", "generate", "--trigger-size", "10", "--trigger-epochs", "1"]
        + ["--recover-epochs", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    check = invoke(
        ["verify", tmp_path / "qr.ticket", "--blackbox", "--credential", tmp_path / "qr.cred.json"]
        + ["--key", tmp_path / "alice.key", "--json"]
    )
    report = json.loads(check.output)
    assert [e["name"] for e in report["evidence"]] == ["W3 QR", "B1 triggers"]
    assert report["verdict"]["tests"] == 2
    assert check.exit_code == 0


def test_other_windows_of_the_layer_are_scored_exactly(make_ticket) -> None:

    ticket = _ticket(make_ticket)
    params = plan_qr(ticket.mask, "fc1.weight", make_symbol(TEXT), b"\x08" * 32)
    signed = write_qr(ticket.mask, ticket.trained, ticket.rewind, params).mask
    conn = channel_connectivity(signed["fc1.weight"])
    reading = read_qr(signed, params)
    others = reading.others
    assert others is not None and others.exceeding == 0
    assert others.empirical_p == pytest.approx(1 / (1 + others.count))
    # Brute force over every offset that does not overlap the recorded window.
    data = ~params.symbol.function
    light = ~params.symbol.dark
    scores = []
    for r in range(conn.shape[0] - 28):
        for c in range(conn.shape[1] - 28):
            if abs(r - params.row) < 29 and abs(c - params.col) < 29:
                continue
            window = conn[r : r + 29, c : c + 29].numpy()
            scores.append(int((window[data] == light[data]).sum()))
    assert others.count == len(scores)
    assert others.best == max(scores)
    assert others.mean == pytest.approx(float(np.mean(scores)))
    # An unsigned layer's recorded window is just one window among many.
    unsigned = read_qr(ticket.mask, params)
    assert unsigned.others.empirical_p > 0.01
