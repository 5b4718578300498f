"""Subjects: the native on-disk format, the synthetic generator, importers and video tracking."""

from headavatar.subjects.format import HEAD_LABELS, LABELS, Subject, SubjectWriter, Tracking

__all__ = ["Subject", "SubjectWriter", "Tracking", "LABELS", "HEAD_LABELS"]
