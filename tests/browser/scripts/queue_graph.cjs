// Loads a UI workflow, queues it from the page (so the page's workflow goes into the PNG metadata),
// waits for it, and returns the workflow as the page would save it afterwards.
module.exports = async (page, { workflow }) => {
  return await page.evaluate(async (workflow) => {
    const app = window.app;
    await app.loadGraphData(workflow, true, true, "keycheck");
    const res = await app.queuePrompt(0, 1);
    const q = await (await fetch("/history")).json();
    for (let k = 0; k < 600; k++) {
      const h = await (await fetch("/queue")).json();
      if (!h.queue_running.length && !h.queue_pending.length) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    const history = await (await fetch("/history")).json();
    return { saved: app.graph.serialize(), history };
  }, workflow);
};
