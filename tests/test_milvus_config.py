"""Tests of lce_tf.index.milvus_config: MilvusConfig's defaults by size, overrides, round trip and rejections,
and the server URIs index.json may record. Pure Python: no Milvus needed."""

import json

import pytest

from lce_tf.index import milvus_config
from lce_tf.index.milvus_config import MilvusConfig


def test_config_defaults_and_overrides():
    # nlist = round(4 * sqrt(10,000)) = 400; nprobe = max(16, ceil(400 / 20) = 20) = 20
    config = MilvusConfig.for_size(10_000, 128)
    assert (config.index_type, config.index_params, config.search_params) == ("IVF_FLAT", {"nlist": 400},
                                                                              {"nprobe": 20})
    assert config.insert_batch_size == 10_000  # min(10,000, 16 MiB / (4 * 128) = 32,768)
    # 100 vectors: nlist = 40; nprobe = min(40, max(16, 2)) = 16
    assert MilvusConfig.for_size(100, 8).search_params == {"nprobe": 16}
    pq = MilvusConfig.for_size(1_000_000, 96, index_type="IVF_PQ", nprobe=64)
    assert pq.index_params == {"nlist": 4000, "m": 24, "nbits": 8} and pq.search_params == {"nprobe": 64}
    hnsw = MilvusConfig.for_size(50, 8, index_type="HNSW", M=32)
    assert hnsw.index_params == {"M": 32, "efConstruction": 200} and hnsw.search_params == {"ef": 64}
    assert hnsw.search_params_for(100, {}) == {"ef": 100}  # ef is raised to k
    assert MilvusConfig.from_dict(json.loads(json.dumps(pq.to_dict()))) == pq
    assert MilvusConfig.for_size(10, 4, index_type="FLAT").index_params == {}


@pytest.mark.parametrize("call, message", [
    (lambda: MilvusConfig.for_size(100, 8, nlists=4), r"IVF_FLAT has no option\(s\) nlists \(options: index_type, "
                                                      r"num_neighbors, insert_batch_size, nlist, nprobe\)"),
    (lambda: MilvusConfig.for_size(100, 8, index_type="FLAT", nprobe=3), r"FLAT has no option\(s\) nprobe"),
    (lambda: MilvusConfig.for_size(100, 8, index_type="ANNOY"), r"index_type must be one of FLAT, IVF_FLAT"),
    (lambda: MilvusConfig.for_size(100, 8, nlist=4, nprobe=9), r"nprobe \(9\) exceeds nlist \(4\)"),
    (lambda: MilvusConfig.for_size(100, 8, nlist=0), r"nlist must be an integer >= 1; received 0"),
    (lambda: MilvusConfig.for_size(100, 10, index_type="IVF_PQ", m=4), r"IVF_PQ m \(4\) must divide the dimension 10"),
    (lambda: MilvusConfig(index_type="HNSW").check_for(lite=True),
     r"Milvus index type HNSW needs a Milvus server \(pass a server URI\); Milvus Lite accepts only FLAT, IVF_FLAT, "
     r"AUTOINDEX"),
    (lambda: MilvusConfig.for_size(100, 8).search_params_for(5, {"ef": 3}), r"IVF_FLAT has no search parameter"),
    (lambda: milvus_config.check_server_uri("ftp://host:19530"), r"is not a server address"),
    (lambda: milvus_config.check_server_uri("http://root:Milvus@host:19530"),
     r"holds credentials; pass the token in the environment variable LCE_TF_MILVUS_TOKEN"),
])
def test_config_and_uri_rejections(call, message):
    with pytest.raises(ValueError, match=message):
        call()
