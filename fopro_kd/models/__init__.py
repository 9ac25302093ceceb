"""Models of EKD / FoPro-KD: the frozen teacher, the three-headed student, and the timm weight loading both use."""

from fopro_kd.models.student import EKDStudent, StudentLoadError, StudentOutput, build_student
from fopro_kd.models.teacher import FrozenTeacher, build_teacher
from fopro_kd.models.weights import TeacherLoadError, WeightsLoadError, file_sha256

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
