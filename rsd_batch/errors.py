"""The one base class of errors a user can fix: bad input, a mixed-config resume, an incomplete
merge, a model that will not load. The CLI ends any of them with one `error:` line and exit status 2,
and a SLURM task records it as a user error (no requeue). Each room raises its own subclass; this
module imports nothing, so catching them loads no room (and no torch)."""


class UserError(Exception):
    pass
