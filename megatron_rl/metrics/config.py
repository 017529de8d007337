"""Config section owned by metrics: tensorboard, console and plots."""


from megatron_rl.configurable import require, require_positive, section


@section
class LoggingConfig:
    """Where and how often metrics are written."""

    tensorboard: bool = True
    """Write tensorboard event files."""
    log_dir: str = "outputs/tensorboard"
    """Directory of the tensorboard event files."""
    log_interval: int = 1
    """Print the console summary every N steps."""
    plot: bool = True
    """Save PNG plots of the main curves at the end of the run."""

    def validate(self) -> None:
        """Positive interval, non-empty directory."""
        require_positive(self, "log_interval")
        require(bool(self.log_dir.strip()), "log_dir", "is empty", "give a directory path")
