"""MultiID-Bench evaluation: identity metrics, bench reader, face models, CLIP scores, reports, ``idflux eval``.

Importing this package loads numpy, scipy and torch only; transformers, insightface and matplotlib are
imported when a CLIP scorer, an insightface model or a plot is made.
"""

from idflux.eval.bench import SUBSETS, cases_from_generated, find_generated, load_bench, load_rgb, write_cases
from idflux.eval.cli import add_eval_parser, run_eval
from idflux.eval.clip import ClipScorer
from idflux.eval.evaluate import evaluate, summarize_cases
from idflux.eval.faces import (
    DetectedFace,
    FaceModel,
    InsightFaceModel,
    face_embeddings,
    load_face_model,
    reference_embedding,
    resolve_insightface_pack,
)
from idflux.eval.metrics import copy_paste_score, cosine_matrix, face_metrics, match_faces, summarize
from idflux.eval.report import format_tables, plot_tradeoff, write_report

__all__ = [
    "SUBSETS", "ClipScorer", "DetectedFace", "FaceModel", "InsightFaceModel", "add_eval_parser",
    "cases_from_generated", "copy_paste_score", "cosine_matrix", "evaluate", "face_embeddings", "face_metrics",
    "find_generated", "format_tables", "load_bench", "load_face_model", "load_rgb", "match_faces",
    "plot_tradeoff", "reference_embedding", "resolve_insightface_pack", "run_eval", "summarize",
    "summarize_cases", "write_cases", "write_report",
]
