"""The filesystem model: POSIX semantics (vfs) over metadata, open files and blocks."""
