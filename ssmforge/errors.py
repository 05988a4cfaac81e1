"""The exception types a user can cause. The CLI prints them as one line and exits with code 2."""


class SsmforgeError(Exception):
    """Base of every user-facing error; its message is one line naming the file, key or value."""


class ConfigError(SsmforgeError):
    """A config key is unknown, of the wrong type, or holds an impossible value."""


class DataError(SsmforgeError):
    """Input data (shards, manifests, tokenizers, text files) is missing or malformed."""


class TrainingError(SsmforgeError):
    """Training cannot go on (a lost rank, a non-finite loss under nonfinite_loss=stop); the CLI exits with 3."""


class LostRankError(TrainingError):
    """Another rank of the run is lost: this process's group has a dead member, so the CLI ends the process
    at once with 3 instead of tearing the group down (pretrain.launch.exit_without_teardown)."""


class CheckpointError(SsmforgeError):
    """A checkpoint or model directory is missing, malformed, or does not match the model."""
