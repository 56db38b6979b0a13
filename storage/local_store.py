"""The local-directory backend of `storage.store`: keys map to files under a root; writes are atomic
(temp file + fsync + rename), create-if-absent is a hard link."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from storage.errors import AlreadyExists, NotFound
from storage.store_base import TMP_MARK, Store, fsync, temp_beside


class LocalStore(Store):
    """A directory on the local filesystem; keys map to files under `root`."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/")) if key else self.root

    def _put_file(self, local_path: Path, key: str) -> None:
        target = self._path(key)
        with temp_beside(target) as temp:
            try:
                shutil.copyfile(local_path, temp)
            except FileNotFoundError:
                raise NotFound(f"local file {str(local_path)!r} does not exist") from None
            fsync(temp)
            os.replace(temp, target)

    def _put_bytes(self, data: bytes, key: str, *, overwrite: bool) -> None:
        target = self._path(key)
        with temp_beside(target) as temp:
            temp.write_bytes(data)
            fsync(temp)
            if overwrite:
                os.replace(temp, target)
                return
            try:
                # link() fails if the target exists: an atomic create-if-absent.
                os.link(temp, target)
            except FileExistsError:
                raise AlreadyExists(f"{self._uri_for(key)} already exists") from None

    def _get_file(self, key: str, local_path: Path) -> None:
        source = self._path(key)
        with temp_beside(local_path) as temp:
            try:
                shutil.copyfile(source, temp)
            except (FileNotFoundError, IsADirectoryError):
                raise NotFound(f"{self._uri_for(key)} does not exist") from None
            os.replace(temp, local_path)

    def _get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{self._uri_for(key)} does not exist") from None

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"{self._uri_for(key)} does not exist")
        return path.stat().st_size

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, filenames in os.walk(base):
            for filename in filenames:
                if TMP_MARK not in filename:
                    keys.append((Path(dirpath) / filename).relative_to(self.root).as_posix())
        return keys

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._remove_empty_parents(self._path(key).parent)

    def _delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix)
        if not base.is_dir():
            return 0
        count = len(self._list(prefix))
        shutil.rmtree(base)
        self._remove_empty_parents(base.parent)
        return count

    def _remove_empty_parents(self, directory: Path) -> None:
        """Remove now-empty directories up to the root, so deleted prefixes leave no husks."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # not empty: a sibling still lives here
                return
            directory = directory.parent

    def _uri_for(self, key: str) -> str:
        return self._path(key).as_uri()
