"""Evaluation: k-NN top-1 of the student's and the teacher's embeddings and the student's head top-1
(evaluator.py), with the k-NN vote itself in knn.py."""
