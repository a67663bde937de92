"""Screenshot of the search page on real images: docs/example_search_page.png.

    python -m uhga_tf.train --flagfile=configs/demo.flags
    python -m uhga_tf.export --checkpoint=runs/demo --export_dir=models/uhga
    python docs/page_screenshot.py --model=models/uhga/1

Writes the first --per_class Fashion-MNIST test images of each class as PNGs
in class folders, indexes them with `python -m uhga_tf.index build`, starts
`python -m uhga_tf.search_page` on a free port, and in headless Chromium
(Debian `chromium` and `chromium-driver`, through selenium) uploads test
image --query (not in the index; 60017 is the coat of the README's `search`
example), waits until every tile has its thumbnail and saves the window as
--out. Takes about a minute on 2 cores.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from uhga_tf import child_process

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

flags.DEFINE_string("model", None, "Exported SavedModel (models/uhga/1).")
flags.DEFINE_string("out", os.path.join(HERE, "example_search_page.png"),
                    "PNG to write.")
flags.DEFINE_integer("per_class", 40, "Indexed test images per class.",
                     lower_bound=1)
flags.DEFINE_integer("query", 60017, "Dataset row of the uploaded image "
                     "(a test image, kept out of the index).")
flags.DEFINE_integer("top_k", 12, "Tiles on the page (two rows of six).",
                     lower_bound=1)
flags.DEFINE_string("window", "1000,900", "Browser window width,height.")
flags.mark_flag_as_required("model")
FLAGS = flags.FLAGS
TIMEOUT_S = 120


def write_images(root):
    """Class-folder PNGs of the test images and the query; the query path."""
    import numpy as np
    from PIL import Image

    from uhga_tf.data import datasets

    data = datasets.load_dataset("fashion_mnist")
    test = np.flatnonzero(data.partition == "test")
    if FLAGS.query not in test:
        raise ValueError(
            f"query must be a test row in [{test[0]}, {test[-1]}]; received "
            f"query={FLAGS.query}")
    for label, name in enumerate(data.class_names):
        # A folder name is the label the page shows: no "/" in it.
        folder = os.path.join(root, "images", name.replace("/", " or "))
        os.makedirs(folder)
        rows = [i for i in test if data.labels[i] == label
                and i != FLAGS.query][:FLAGS.per_class]
        for row in rows:
            Image.fromarray(data.images[row]).save(
                os.path.join(folder, f"{row}.png"))
    query = os.path.join(root, f"query_{FLAGS.query}.png")
    Image.fromarray(data.images[FLAGS.query]).save(query)
    return query


def run_command(*args):
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def start_page(index_dir, log_path):
    """`uhga_tf.search_page` on a free port: (process, url)."""
    out_path = log_path + ".out"
    proc = child_process.start(
        ["uhga_tf.search_page", f"--index={index_dir}",
         f"--model={FLAGS.model}", "--port=0", f"--top_k={FLAGS.top_k}"],
        out_path, log_path, cwd=REPO)
    return proc, child_process.wait_for_output(
        proc, out_path, log_path, child_process.page_url, TIMEOUT_S,
        poll_s=0.2)


def screenshot(url, query, out):
    """Upload `query` on the page at `url`; save the window once loaded."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        raise FileNotFoundError(
            "chromium and chromedriver are not installed (Debian: chromium "
            "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     f"--window-size={FLAGS.window}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=driver_path),
        options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT_S)
        driver.get(url)
        driver.find_element(By.ID, "file").send_keys(query)
        WebDriverWait(driver, TIMEOUT_S).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".tile"))
            == FLAGS.top_k and all(
                img.get_property("naturalWidth") > 0
                for img in d.find_elements(By.CSS_SELECTOR, ".tile img")))
        driver.save_screenshot(out)
        return [tile.text.replace("\n", " ")
                for tile in driver.find_elements(By.CSS_SELECTOR, ".tile")]
    finally:
        driver.quit()


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        query = write_images(root)
        index_dir = os.path.join(root, "index")
        run_command("uhga_tf.index", "build", f"--model={FLAGS.model}",
                    f"--images={os.path.join(root, 'images')}",
                    f"--out={index_dir}", "--noprogress")
        proc, url = start_page(index_dir, os.path.join(root, "page.log"))
        try:
            tiles = screenshot(url, query, FLAGS.out)
        finally:
            child_process.stop(proc)
    print(f"wrote {FLAGS.out}; tiles: {' | '.join(tiles)}")


if __name__ == "__main__":
    app.run(main)
