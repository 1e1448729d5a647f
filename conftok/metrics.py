"""Metric names shared by training, Ray Tune, reports and dashboards."""

VAL_ACCURACY = "val/accuracy"  # mean over domains of token accuracy
VAL_CALIBRATION_ERROR = "val/calibration_error"  # mean over domains
VAL_SCORE = "val/score"  # accuracy - lambda * calibration error (search objective)
VAL_BRIER = "val/brier"
VAL_AUROC = "val/auroc"
VAL_ANSWER_ACCURACY = "val/answer_accuracy"
VAL_TOKEN_RATE = "val/token_rate"
TRAIN_LOSS = "train/loss"  # the total that is back-propagated
TRAIN_TOKEN_LOSS = "train/token_loss"  # cross-entropy of the confidence token
TRAIN_PLACEMENT_LOSS = "train/placement_loss"  # -log(1 - p(confidence token)) at answer positions
TRAIN_KL = "train/kl"  # KL(base || tuned) at answer positions (live or stored)
TRAIN_ANSWER_CE = "train/answer_ce"  # -log p(answer token) at answer positions
TRAIN_LEARNING_RATE = "train/learning_rate"
TRAIN_GRAD_NORM = "train/grad_norm"
STEP = "step"
EPOCH = "epoch"
# The run's n-th validation (1, 2, ...), counting those before a resume: Tune's own training_iteration restarts
# at 1 in a trial restarted by `ray_jobs.tune --resume`, whose run goes on from its checkpoint.
VALIDATION = "validation"
VALIDATIONS_PLANNED = "validations_planned"  # how many the run makes to its end: VALIDATION equals it at the last

# Per-domain keys are f"val/{domain}/{name}" with these names.
DOMAIN_METRICS = ("token_accuracy", "calibration_error", "brier", "auroc", "answer_accuracy",
                  "token_rate", "wrong_domain_token_rate", "unparsed", "n")


def domain_key(domain: str, name: str) -> str:
    return f"val/{domain}/{name}"
