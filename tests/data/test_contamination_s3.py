"""The contamination check reads shards from object storage (a moto S3 server on 127.0.0.1) as it reads
local ones: the same report, the shards fetched into the cache and checked there."""

import json
from pathlib import Path

import pytest

from distllm.eval import contamination as C
from distllm.eval.tasks import load_task

pytest.importorskip("s3fs")


def test_contamination_of_s3_shards_equals_the_local_check(s3_bucket, prepared_data, tiny_corpus, tmp_path):
    from test_storage import upload

    url = f"{s3_bucket.url}/corpus"
    upload(s3_bucket.filesystem(), Path(prepared_data), url)
    rows = []
    for doc in sorted(tiny_corpus.iterdir())[:12]:  # a sentence of each document, and one that is nowhere
        words = doc.read_text(encoding="utf-8").split()
        rows.append({"context": " ".join(words[3:18]), "choices": [" ".join(words[18:22]), "no"], "label": 0})
    rows.append({"context": "a sentence that appears in no document of the", "choices": ["corpus"], "label": 0})
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(path)
    storage = {"cache_dir": str(tmp_path / "cache"), "storage_options": s3_bucket.storage_options}
    remote, dirty_remote = C.check(url, [task], num_proc=2, storage=storage, progress=False)
    local, dirty_local = C.check(str(prepared_data), [task], num_proc=1, progress=False)
    assert remote["tasks"] == local["tasks"] and dirty_remote == dirty_local
    assert 8 <= remote["tasks"]["t"]["dirty"] < len(rows)  # the val split's documents are not trained on
    assert 12 not in remote["tasks"]["t"]["dirty_indices"]
    assert sorted(p.name for p in (tmp_path / "cache").rglob("train_*.bin"))  # fetched into the cache
