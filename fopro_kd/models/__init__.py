"""Models of EKD / FoPro-KD: the frozen teacher and the three-headed student."""

from fopro_kd.models.student import EKDStudent, StudentLoadError, StudentOutput, build_student
from fopro_kd.models.teacher import (
    FrozenTeacher,
    TeacherLoadError,
    WeightsLoadError,
    build_teacher,
    file_sha256,
)

__all__ = [
    "EKDStudent",
    "FrozenTeacher",
    "StudentLoadError",
    "StudentOutput",
    "TeacherLoadError",
    "WeightsLoadError",
    "build_student",
    "build_teacher",
    "file_sha256",
]
