"""``classes.json`` of a labelled image shard set: the readable class names zero-shot evaluation prompts with,
from the input's class ids or a ``--class-names`` file, made unique.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from preprocess.image_corpora import LabelSpace
from preprocess.input_records import InputError


@dataclass(frozen=True)
class ClassNamesFile:
    """A --class-names file: readable names by label (a JSON list) or by class id (a JSON object, or
    ``id<TAB>name`` lines; on a line without a tab the first whitespace separates them, as in ImageNet's
    LOC_synset_mapping.txt)."""

    path: Path
    names: list[str] | dict[str, str]

    @classmethod
    def read(cls, path: Path) -> ClassNamesFile:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--class-names {path}: {e}") from None
        if not text.lstrip().startswith(("{", "[")):
            return cls(path, cls._parse_lines(path, text))
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--class-names {path}: invalid JSON: {e}") from None
        values = names.values() if isinstance(names, dict) else names
        if not isinstance(names, (list, dict)) or not all(isinstance(n, str) and n.strip() for n in values):
            raise InputError(f"--class-names {path}: expected a JSON list of names or an object of id -> name")
        return cls(path, names)

    @staticmethod
    def _parse_lines(path: Path, text: str) -> dict[str, str]:
        names: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = [p.strip() for p in (line.split("\t", 1) if "\t" in line else line.split(maxsplit=1))]
            if len(parts) != 2 or not parts[1]:
                raise InputError(f"--class-names {path}:{lineno}: expected 'id<TAB>name'")
            if parts[0] in names:
                raise InputError(f"--class-names {path}:{lineno}: class {parts[0]!r} is named twice")
            names[parts[0]] = parts[1]
        return names

    def error(self, message: str) -> InputError:
        return InputError(f"--class-names {self.path}: {message}")

    def missing(self, ids: Sequence[str]) -> InputError:
        more = f" (and {len(ids) - 1} more)" if len(ids) > 1 else ""
        return self.error(f"no name for class {ids[0]!r}{more} of the input")

    def readable(self, labels: LabelSpace) -> list[str]:
        """The name of each class, in label order. Classes with ids (folder, label or ClassLabel names): a list
        names them by label and must have one name per class, an object by id. Integer labels without names:
        the file lists the classes itself (a list by label, or an object keyed '0', '1', ...)."""
        if labels.classes:
            ids = list(labels.classes)
            if isinstance(self.names, list):
                if len(self.names) != len(ids):
                    raise self.error(f"{len(self.names)} names by label, but the input has {len(ids)} classes")
                return disambiguate(self.names, ids, self)
            missing = [i for i in ids if i not in self.names]
            if missing:
                raise self.missing(missing)
            return disambiguate([self.names[i] for i in ids], ids, self)
        if isinstance(self.names, list):
            names = self.names
        else:
            try:
                numbered = {int(key): name for key, name in self.names.items()}
            except ValueError:
                raise self.error(
                    "the input's labels are integers: name them by a JSON list or ids '0', '1', ..."
                ) from None
            names = [numbered.get(i, "") for i in range(max(numbered, default=-1) + 1)]
        ids = [str(i) for i in range(len(names))]
        missing = [i for i, name in zip(ids, names) if not name]
        missing += [str(i) for i in sorted(labels.integers) if not 0 <= i < len(names)]
        if missing:
            raise self.missing(missing)
        return disambiguate(names, ids, self)


def disambiguate(names: Sequence[str], ids: Sequence[str], source: ClassNamesFile) -> list[str]:
    """classes.json maps name -> label, so a readable name shared by several classes (ImageNet has two 'crane's,
    a bird and a machine, and two 'maillot's) becomes 'name (id)' for each of them, e.g. 'crane (n02012849)';
    every other name stays as given."""
    counts = Counter(names)
    unique = [f"{name} ({i})" if counts[name] > 1 else name for name, i in zip(names, ids)]
    clash = [name for name, n in Counter(unique).items() if n > 1]
    if clash:
        raise source.error(f"class name {clash[0]!r} twice, even with its class id added")
    return unique


def class_index(labels: LabelSpace, names: ClassNamesFile | None) -> dict[str, int] | None:
    """classes.json, ``{name: label}`` (the class names zero-shot evaluation prompts with); None for integer
    labels that nothing names."""
    classes = names.readable(labels) if names else list(labels.classes)
    return {name: i for i, name in enumerate(classes)} if classes else None
