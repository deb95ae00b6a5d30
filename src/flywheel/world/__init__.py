"""The built-in toy world: task families with checkable answers, a hidden oracle, simulated labelers, and generators
for the pretraining corpus, demonstrations and prompt splits. Pure Python + numpy (no torch).

    from flywheel.world import WorldConfig, write_world, load_tasks, score
    files = write_world(WorldConfig(out="data/world", seed=0))
    tasks = load_tasks(files["eval_tasks"])          # hidden: only eval and the labelers read these
    score(tasks[0], "The capital of France is Paris.").total

See docs/world.md for the families, the oracle's axes, the labeler model and the split sizes.
"""

from flywheel.world.candidates import Imperfections, candidate_responses, demonstration
from flywheel.world.corpus import make_corpus
from flywheel.world.generate import (
    SPLITS,
    World,
    WorldConfig,
    family_counts,
    fewshot_probe,
    generate_world,
    load_tasks,
    read_jsonl,
    write_world,
)
from flywheel.world.labelers import (
    DEFAULT_TEMPERATURE,
    TARGET_AGREEMENT,
    Labeler,
    LengthBias,
    agreement,
    calibrate_temperature,
    calibration_sets,
    default_panel,
    expected_agreement,
    label_rankings,
    oracle_ranker_accuracy,
    panel_agreement,
)
from flywheel.world.oracle import VERDICTS, WEIGHTS, Scores, score
from flywheel.world.tasks import FAMILIES, FAMILY_MIX, SHOTS, Task, make_task, random_task

__all__ = [
    "DEFAULT_TEMPERATURE",
    "FAMILIES",
    "FAMILY_MIX",
    "SHOTS",
    "SPLITS",
    "TARGET_AGREEMENT",
    "VERDICTS",
    "WEIGHTS",
    "Imperfections",
    "Labeler",
    "LengthBias",
    "Scores",
    "Task",
    "World",
    "WorldConfig",
    "agreement",
    "calibrate_temperature",
    "calibration_sets",
    "candidate_responses",
    "default_panel",
    "demonstration",
    "expected_agreement",
    "family_counts",
    "fewshot_probe",
    "generate_world",
    "label_rankings",
    "load_tasks",
    "make_corpus",
    "make_task",
    "oracle_ranker_accuracy",
    "panel_agreement",
    "random_task",
    "read_jsonl",
    "score",
    "write_world",
]
