"""Credential redaction (distllm.redact): what is redacted, what is not, and the config file written with it."""

import dataclasses

import pytest
import yaml

from distllm.config import Config, from_dict, save_config
from distllm.redact import (REDACTED, command_line_has_secrets, drop_redacted, is_secret_key, redact, redact_text,
                            secret_values)


def test_no_default_config_value_is_redacted():
    """``shard_tokens``, ``tokenizer``, ``keep_last`` ... are no credentials: redaction must not change a
    config without any (a resume compares saved configs)."""
    plain = Config().to_dict()
    assert redact(plain) == plain


def test_no_config_key_looks_like_a_credential():
    """A config key named like a credential (``pad_token``, ``api_key``) would be redacted from the saved
    config, so that eval/generate and resumes would not see it: rename it, or decide it is one."""
    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield prefix + f.name
            if dataclasses.is_dataclass(value):
                yield from keys(value, prefix + f.name + ".")

    assert [k for k in keys(Config()) if is_secret_key(k.rpartition(".")[2])] == []


@pytest.mark.parametrize("name", ["key", "secret", "token", "password", "passwd", "aws_secret_access_key",
                                  "aws_access_key_id", "session_token", "sessionToken", "apiKey", "APIKey",
                                  "api-key", "client_secret", "credentials", "Authorization", "sas_token",
                                  "connection_string", "X-Amz-Signature", "private_key"])
def test_credential_key_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", ["tokenizer", "shard_tokens", "tokens_seen", "keep_last", "monkey", "text_field",
                                  "keyword", "max_tokens", "s3://a/key", "data/secret_docs", "anon"])
def test_names_that_are_no_credentials(name):
    assert not is_secret_key(name)


def test_storage_options_urls_and_mix_keys():
    config = {"data": {
        "dir": "s3://AKIAX:se/cr+et@bucket/corpus",
        "storage_options": {"key": "AKIAPLANTED", "secret": "s3cr3tPLANTED", "anon": False, "token": None,
                            "client_kwargs": {
                                "endpoint_url": "http://u:pa@ss@127.0.0.1:9000/x?X-Amz-Signature=abcd1234&y=1"},
                            "headers": {"Authorization": "Bearer tokPLANTED"}, "port": 9000},
        "mix": {"https://ghp_PLANTEDTOKEN@host/web": 0.7, "data/code": 0.3},
    }}
    out = redact(config)["data"]
    assert out["dir"] == f"s3://AKIAX:{REDACTED}@bucket/corpus"
    o = out["storage_options"]
    assert o["key"] == o["secret"] == o["headers"]["Authorization"] == REDACTED
    assert o["anon"] is False and o["token"] is None and o["port"] == 9000  # nothing hidden there
    assert o["client_kwargs"]["endpoint_url"] == \
        f"http://u:{REDACTED}@127.0.0.1:9000/x?X-Amz-Signature={REDACTED}&y=1"
    assert out["mix"] == {f"https://{REDACTED}@host/web": 0.7, "data/code": 0.3}
    assert secret_values(config) == {"se/cr+et", "AKIAPLANTED", "s3cr3tPLANTED", "pa@ss", "abcd1234",
                                     "Bearer tokPLANTED", "ghp_PLANTEDTOKEN"}


def test_text_is_cleaned_of_url_credentials_and_known_secrets():
    secrets = {"s3cr3tPLANTED"}
    line = "connect to http://me:pw123@host:5000/api failed; key s3cr3tPLANTED rejected"
    assert redact_text(line, secrets) == f"connect to http://me:{REDACTED}@host:5000/api failed; key {REDACTED} rejected"
    assert redact_text("step 10 | loss 2.3 | http://host:80/x") == "step 10 | loss 2.3 | http://host:80/x"


def test_a_config_read_back_falls_back_to_environment_credentials():
    saved = redact({"data": {"dir": "s3://bucket/x", "storage_options": {
        "key": "AKIAPLANTED", "client_kwargs": {"endpoint_url": "http://u:pw@host:9"}}}})
    assert drop_redacted(saved) == {"data": {"dir": "s3://bucket/x", "storage_options": {
        "client_kwargs": {"endpoint_url": "http://u@host:9"}}}}
    from_dict(drop_redacted(saved))  # a valid config again


def test_saved_config_is_redacted(tmp_path):
    cfg = from_dict({"data": {"storage_options": {"key": "AKIAPLANTED", "secret": "s3cr3tPLANTED"}}})
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "PLANTED" not in text
    assert yaml.safe_load(text)["data"]["storage_options"] == {"key": REDACTED, "secret": REDACTED}


def test_command_line_with_a_credential_is_noticed():
    secrets = secret_values({"data": {"storage_options": {"secret": "s3cr3tPLANTED"}}})
    argv = ["distllm", "train", "run.yaml", "--data.storage_options={secret: s3cr3tPLANTED}"]
    assert command_line_has_secrets(secrets, argv)
    assert command_line_has_secrets(set(), ["distllm", "train", "--data.dir=s3://k:s3cr3t@bucket/x"])
    assert not command_line_has_secrets(secrets, ["distllm", "train", "run.yaml", "--train.max_steps=10"])
